"""What watching a run costs: tracking and validation against the training steps of one run.

    python tools/bench_tracking.py runs/demo [--calls 50]

Reads the run's logs/metrics.jsonl (the Quick start's, say) and prints, all from that one run:
- validation: the seconds of each validation (time/validation) against the training time (the sum
  of train/step_s over the steps), i.e. what train.val_every costs;
- tracking: the run's own logged scalars replayed through each tracker (`--calls` logging calls,
  the jsonl file included, timed here), as a fraction of a logging window's training time
  (train.log_every x the mean train/step_s). The trackers' one-time start (imports, W&B's service,
  MLflow's database) is printed apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.config import load_config  # noqa: E402
from pipeline.run_dir import RunDir  # noqa: E402
from pipeline.tracking import open_tracker, read_metrics  # noqa: E402


def windows(records: list[dict]) -> list[tuple[int, dict]]:
    """The run's logging calls: (step, scalars) of each train/loss step."""
    by_step: dict[int, dict] = {}
    for r in records:
        if not r["name"].startswith(("val/", "time/validation")):
            by_step.setdefault(r["step"], {})[r["name"]] = r["value"]
    return sorted(by_step.items())


def tracker_cost(name: str, cfg, calls: list[tuple[int, dict]], n: int) -> tuple[float, float]:
    """(seconds to open and close, seconds per logging call) of track=name, in a scratch folder."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(cfg, track=dataclasses.replace(cfg.track, name=name), run_dir=tmp)
        tic = time.perf_counter()
        tracker = open_tracker(cfg, RunDir(tmp), start=0)
        opened = time.perf_counter() - tic
        tic = time.perf_counter()
        for i in range(n):
            step, scalars = calls[i % len(calls)]
            tracker.log(i + 1, scalars)
        per_call = (time.perf_counter() - tic) / n
        tic = time.perf_counter()
        tracker.close()
        return opened + time.perf_counter() - tic, per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    records = read_metrics(args.run_dir / "logs" / "metrics.jsonl")
    cfg = load_config([])  # the trackers log its settings as hyper-parameters; their values do not matter here
    log_every = OmegaConf.load(args.run_dir / "config.yaml").train.log_every
    calls = windows(records)
    step_s = [s["train/step_s"] for _, s in calls]
    mean_step = sum(step_s) / len(step_s)
    steps = calls[-1][0]
    training = sum(s["train/step_s"] * (step - previous) for (step, s), previous
                   in zip(calls, [0] + [c[0] for c in calls[:-1]]))
    validations = [r["value"] for r in records if r["name"] == "time/validation"]
    print(f"run {args.run_dir}: {steps} steps, mean step {mean_step * 1000:.1f} ms, logged every {log_every} steps")
    print(f"validation: {len(validations)} x {sum(validations) / max(1, len(validations)):.2f} s = "
          f"{sum(validations):.1f} s against {training:.1f} s of training steps: "
          f"{100 * sum(validations) / training:.1f}%")
    print(f"{'track':<12}{'start+close s':>14}{'ms per call':>13}{'% of a window':>15}")
    for name in ("none", "tensorboard", "wandb", "mlflow"):
        once, per_call = tracker_cost(name, cfg, calls, args.calls)
        print(f"{name:<12}{once:>14.2f}{per_call * 1000:>13.2f}{100 * per_call / (log_every * mean_step):>15.3f}")


if __name__ == "__main__":
    main()
