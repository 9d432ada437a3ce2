"""Which finetuning to pick, on data=glyphs (issue 39): full finetuning against layer-wise lr decay
0.9 / 0.75 / 0.65 and LoRA rank 8 / 32, each over --seeds seeds, under the glyphs study's protocol
(tools/study_glyphs.py: the tiny ViT pretrained on disjoint glyph classes, then 3 epochs of RS@k on
the benchmark's classes; the same images seen, sampler, augmentation and schedule for every arm).

    python tools/study_finetuning.py --out runs/finetuning [--jobs 2] [--seeds 3]
    python tools/study_finetuning.py --out runs/finetuning --report     only (re)write the report

Two tools/sweep.py folders in OUT: `layer_decay` (train.layer_decay=1.0 is full finetuning) and `lora`
(model.lora.rank; the adapters at train.lr=1e-3, LoRA's usual tenfold lr, the head at the protocol's
train.head_lr). OUT/report.md: per arm recall@1 and map@r (mean ± sample std), the difference to
full finetuning with Welch's p, and the cost on the CPU: the median of the runs' train/step_s and
the largest mem/peak_gb (logs/metrics.jsonl). The pretraining is the glyphs study's (OUT/pretrain;
point --pretrained at an existing export to reuse one). Every step skips what is finished.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

from pipeline.sweep import grid as sweep
from pipeline.run_dir import RunDir

# The glyphs study's protocol and helpers, loaded by path: tools/ on sys.path would put its sweep.py
# before pipeline's names.
_spec = importlib.util.spec_from_file_location("study_glyphs", Path(__file__).resolve().parent / "study_glyphs.py")
glyphs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(glyphs)

FULL = "train.layer_decay=1.0"  # the reference arm: full finetuning
SWEEPS = {  # name: (grid words before the seeds, fixed words after the protocol's)
    "layer_decay": (["train.layer_decay=1.0,0.9,0.75,0.65"], []),
    "lora": (["model.lora.rank=8,32"], ["train.lr=1e-3"]),
}
METRICS = ["recall@1", "map@r"]


def costs(out: Path, name: str) -> dict[str, dict[str, float]]:
    """setting -> {step_s: median over the runs' logged windows, peak_gb: the largest}, from each run's
    logs/metrics.jsonl."""
    from pipeline.tracking import read_metrics, series

    found: dict[str, dict[str, list[float]]] = {}
    if not (out / name / sweep.PLAN).is_file():
        return {}
    for run in sweep.load_plan(out / name)[1]:
        path = RunDir(out / name / run.name).logs / "metrics.jsonl"
        if path.is_file():
            records = read_metrics(path)
            arm = found.setdefault(run.setting, {"step_s": [], "peak_gb": []})
            arm["step_s"] += series(records, "train/step_s")[1]
            arm["peak_gb"] += series(records, "mem/peak_gb")[1]
    return {s: {"step_s": statistics.median(v["step_s"]) if v["step_s"] else None,
                "peak_gb": max(v["peak_gb"]) if v["peak_gb"] else None} for s, v in found.items()}


def report(out: Path) -> str:
    arms: dict[str, dict] = {}
    spent: dict[str, dict] = {}
    for name in SWEEPS:
        path = out / name / sweep.SUMMARY_JSON
        if path.is_file():
            arms.update(json.loads(path.read_text()))
        spent.update(costs(out, name))
    full = arms.get(FULL, {})
    lines = ["# Which finetuning: full, layer-wise lr decay or LoRA (glyphs)", "",
             f"Made by `python tools/study_finetuning.py --out {out}`. Each cell: mean ± sample std over the seeds; "
             "the difference to full finetuning with Welch's two-sided p-value; step time: the median logged "
             "train/step_s; peak: the largest mem/peak_gb (the CPU's resident memory).", "",
             "| arm | recall@1 | map@r | recall@1 - full | step s | peak GB |", "|---|---|---|---|---|---|"]
    for setting in sorted(arms, key=lambda s: not s.startswith("train.layer_decay")):  # layer decay first
        stats, cost = arms[setting], spent.get(setting, {})
        step, peak = cost.get("step_s"), cost.get("peak_gb")
        lines.append(f"| {setting} | {glyphs.cell(stats.get('recall@1'))} | {glyphs.cell(stats.get('map@r'))} | "
                     f"{glyphs.welch(full.get('recall@1'), stats.get('recall@1')) if setting != FULL else ''} | "
                     f"{'n/a' if step is None else f'{step:.3f}'} | {'n/a' if peak is None else f'{peak:.2f}'} |")
    return "\n".join(lines + [""])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the study's folder")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2, one thread each)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    parser.add_argument("--pretrained", type=Path, help="an export to start from (default: pretrain in OUT/pretrain)")
    parser.add_argument("--report", action="store_true", help="only write the report of what has run")
    options = parser.parse_args(argv)
    out = options.out.resolve()
    if not options.report:
        start = options.pretrained
        if start is None:
            glyphs.pipeline(out / "pretrain", "stage=all", *glyphs.PRETRAIN)
            start = out / "pretrain" / "export"
        glyphs.run_sweeps(out, start.resolve(), options.jobs, options.seeds, SWEEPS)
    (out / "report.md").write_text(report(out))
    print(f"study: report in {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
