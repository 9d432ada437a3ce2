"""Experiment tracking: the training scalars to TensorBoard, W&B or MLflow (`track=`), and always to
`run_dir/logs/metrics.jsonl`, on rank 0 only.

    tracker = open_tracker(cfg, rd, start)   # a no-op on ranks > 0
    tracker.log(step, {"train/loss": 0.41, ...})
    tracker.close()

`metrics.jsonl` holds one JSON object per scalar and step, `{"step": 10, "time": 1764000000.1,
"name": "train/loss", "value": 0.41}` (time: Unix seconds), flushed at every log call, so a tool or
`tail -f` reads a run while it trains, with nothing but json (`read_metrics` here).

Resuming from the checkpoint of step N drops what a crashed run logged after N, in every sink that
allows it (metrics.jsonl; TensorBoard through its purge step), since the resumed run logs those
steps again; W&B and MLflow continue the same run (ids kept in `run_dir/logs/tracker.json`). A run
started from step 0 starts fresh sinks. The resolved config goes to each tracker as its
hyper-parameters.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

from pipeline.config import Config, TrackConfig, to_yaml
from pipeline.parallel import distributed
from pipeline.errors import UserError
from pipeline.run_dir import RunDir, write_json

log = logging.getLogger(__name__)

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_installed(track: TrackConfig) -> None:
    """The chosen tracker's library is installed (a preflight check: the name was checked at load)."""
    package = PACKAGES.get(track.name)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"track={track.name} needs the {package} package: pip install '.[track]' (or track=tensorboard)")


def metrics_path(rd: RunDir) -> Path:
    return rd.logs / "metrics.jsonl"


def read_metrics(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl, in the order written."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(records: list[dict], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar."""
    pairs = [(r["step"], r["value"]) for r in records if r["name"] == name]
    return [s for s, _ in pairs], [v for _, v in pairs]


def hyperparameters(cfg: Config) -> dict:
    """The resolved config as flat dotted keys; lists as text (trackers take numbers, text, booleans)."""
    flat = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = str(value) if isinstance(value, (list, tuple)) else value
    walk(dataclasses.asdict(cfg), "")
    return flat


class Tracker:
    """Where scalars go; this base is the no-op of ranks > 0 and of track=none."""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsFile(Tracker):
    """run_dir/logs/metrics.jsonl: records after `start` dropped, then appended to."""

    def __init__(self, path: Path, start: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(path) if r["step"] <= start] if start and path.is_file() else []
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
        self.file = open(path, "a")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        now = time.time()
        self.file.write("".join(json.dumps({"step": step, "time": now, "name": name, "value": float(value)}) + "\n"
                                for name, value in scalars.items()))
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoard(Tracker):
    """Event files in run_dir/tb/ (torch.utils.tensorboard's SummaryWriter)."""

    def __init__(self, cfg: Config, folder: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        if not start:
            shutil.rmtree(folder, ignore_errors=True)
        # purge_step: TensorBoard discards the events a crashed run wrote after the checkpoint resumed from.
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=start + 1 if start else None)
        for summary in hparams(hyperparameters(cfg), {cfg.train.best_metric: 0.0}):  # HParams dashboard
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + to_yaml(cfg) + "\n```")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    """A W&B run in run_dir/wandb/ (offline unless track.wandb_mode=online)."""

    def __init__(self, cfg: Config, rd: RunDir, run_id: str | None):
        import wandb

        self.run = wandb.init(project=cfg.track.project, name=cfg.track.run_name or rd.root.name, dir=str(rd.root),
                              mode=cfg.track.wandb_mode, config=hyperparameters(cfg), id=run_id,
                              resume="allow" if run_id else None,
                              settings=wandb.Settings(console="off", silent=True))
        self.id = self.run.id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


def mlflow_name(name: str) -> str:
    """MLflow's metric names allow letters, digits, _ - . space : / only."""
    return name.replace("@", "_at_")


class MLflow(Tracker):
    """An MLflow run, in a local SQLite store (run_dir/mlflow.db) unless track.mlflow_uri names another."""

    BATCH = 100  # MLflow's limit of parameters per log_batch call

    def __init__(self, cfg: Config, rd: RunDir, run_id: str | None):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing leaves the machine unasked
        from mlflow import MlflowClient
        from mlflow.entities import Param

        for noisy in ("mlflow", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        uri = cfg.track.mlflow_uri or f"sqlite:///{(rd.root / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(cfg.track.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            cfg.track.project, artifact_location=(rd.root / "mlartifacts").resolve().as_uri())
        if run_id is None:
            run_id = self.client.create_run(experiment_id, run_name=cfg.track.run_name or rd.root.name).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.id = run_id
        # A parameter cannot change value within a run: a resumed run logs only the keys it lacks.
        logged = self.client.get_run(run_id).data.params
        params = [Param(k, str(v)) for k, v in hyperparameters(cfg).items() if k not in logged]
        for i in range(0, len(params), self.BATCH):
            self.client.log_batch(run_id, params=params[i:i + self.BATCH])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(mlflow_name(k), float(v), now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.id)


class Trackers(Tracker):
    """metrics.jsonl plus the chosen tracker."""

    def __init__(self, sinks: list[Tracker]):
        self.sinks = sinks

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if scalars:
            for sink in self.sinks:
                sink.log(step, scalars)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_tracker(cfg: Config, rd: RunDir, start: int) -> Tracker:
    """Rank 0's sinks for a run that starts (or resumes) at step `start`; a no-op elsewhere."""
    if distributed.rank() != 0:
        return Tracker()
    ids_file = rd.logs / "tracker.json"
    ids = json.loads(ids_file.read_text()) if start and ids_file.is_file() else {}
    sinks: list[Tracker] = [MetricsFile(metrics_path(rd), start)]
    name = cfg.track.name
    if name == "tensorboard":
        sinks.append(TensorBoard(cfg, rd.root / "tb", start))
    elif name in ("wandb", "mlflow"):
        tracker = (WandB if name == "wandb" else MLflow)(cfg, rd, ids.get(name))
        write_json(ids_file, {**ids, name: tracker.id})
        sinks.append(tracker)
    log.info("tracking: %s%s", metrics_path(rd), "" if name == "none" else f" and {name}")
    return Trackers(sinks)
