"""Summarising a grid: each setting's mean, sample std and n of every metric over its finished runs
(the metric names: pipeline/sweep/__init__.py), as SWEEP/summary.json, summary.md and the figures."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pipeline.run_dir import RunDir, write_json
from pipeline.sweep.grid import BATCH, SEED, SUMMARY_JSON, SUMMARY_MD, Run, finished, load_plan

def _flatten(node: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("num_"):
            out[prefix + key] = float(value)
    return out


def _without_finetuned(flat: dict[str, float]) -> dict[str, float]:
    return {k.removeprefix("finetuned/"): v for k, v in flat.items()}


def best_validation(path: Path) -> dict[str, float]:
    """The best value of every `val/...` scalar in a metrics.jsonl (`{"step", "name", "value"}` per line);
    {} without the file. Lines that are not such records (a crash mid-write) are passed over."""
    best: dict[str, float] = {}
    if not path.is_file():
        return best
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            name, value = record["name"], float(record["value"])
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(name, str) and name.startswith("val/") and math.isfinite(value):
            pick = min if "loss" in name else max
            best[name] = pick(best.get(name, value), value)
    return {f"best {name}": v for name, v in best.items()}


def run_metrics(run_dir: Path) -> dict[str, float]:
    """Every metric of one finished run, by the names in the module docstring."""
    rd = RunDir(run_dir)
    metrics = _without_finetuned(_flatten(json.loads((rd.eval / "metrics.json").read_text())))
    diagnostics = rd.eval / "diagnostics.json"
    if diagnostics.is_file():
        metrics.update(_without_finetuned(_flatten(json.loads(diagnostics.read_text()))))
    metrics.update(best_validation(rd.logs / "metrics.jsonl"))
    return dict(sorted(metrics.items(), key=lambda item: not _headline(item[0])))  # the finetuned model's first


def _headline(metric: str) -> bool:
    """The finetuned model's own metrics and the best validation scores."""
    return "/" not in metric or metric.startswith("best ")


def statistics(values: list[float]) -> dict:
    """Mean, sample standard deviation (n - 1; None for a single run) and n."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else None, "n": len(a)}


def summarise(out: Path) -> tuple[dict, dict[str, list[Run]]]:
    """(summary: setting -> metric -> statistics, runs by status: finished / failed / not started)."""
    fixed, runs = load_plan(out)
    status: dict[str, list[Run]] = {"finished": [], "failed": [], "not started": []}
    per_setting: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        folder = Path(out) / run.name
        if finished(run, fixed, out) and (RunDir(folder).eval / "metrics.json").is_file():
            status["finished"].append(run)
            per_setting.setdefault(run.setting, []).append(run_metrics(folder))
        else:
            status["failed" if folder.exists() else "not started"].append(run)
    summary = {}
    for setting in dict.fromkeys(r.setting for r in runs):  # grid order
        found = per_setting.get(setting, [])
        names = list(dict.fromkeys(k for m in found for k in m))
        summary[setting] = {k: statistics([m[k] for m in found if k in m]) for k in names}
    return summary, status


def _cell(s: dict | None) -> str:
    if s is None:
        return ""
    return f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s["std"] is not None else "") + f" ({s['n']})"


def headline(summary: dict) -> list[str]:
    """The finetuned model's metrics and the best validation scores, in order of appearance."""
    return [k for k in dict.fromkeys(k for metrics in summary.values() for k in metrics) if _headline(k)]


def markdown(out: Path, summary: dict, status: dict[str, list[Run]], figures: list[str]) -> str:
    fixed, _ = load_plan(out)
    main = headline(summary)
    rest = [k for k in dict.fromkeys(k for m in summary.values() for k in m) if k not in main]
    lines = [f"# Sweep `{out}`", "",
             f"Fixed: `{' '.join(fixed) or '(none)'}`. Each cell: mean ± sample std (n runs) over the finished "
             f"runs of the setting.", ""]
    for title, keys in (("Finetuned model", main), ("Other models, diagnostics", rest)):
        if not keys:
            continue
        lines += [f"## {title}", "", "| setting | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| `{setting}` | " + " | ".join(_cell(metrics.get(k)) for k in keys) + " |"
                  for setting, metrics in summary.items()]
        lines.append("")
    lines += ["## Runs", "", f"{len(status['finished'])} finished, {len(status['failed'])} failed "
              f"(started but not complete: see their `logs/`), {len(status['not started'])} not started.", ""]
    for state in ("failed", "not started"):
        lines += [f"- {state}: `{out}/{r.name}`" for r in status[state]]
    lines += [""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def aggregate(out: Path) -> tuple[dict, dict[str, list[Run]]]:
    """Write SWEEP/summary.json, summary.md and the figures; return (summary, runs by status)."""
    from pipeline.sweep import plots  # matplotlib only when writing

    out = Path(out)
    summary, status = summarise(out)
    write_json(out / SUMMARY_JSON, summary)
    _, runs = load_plan(out)
    batch = {r.setting: (r.setting_without(SEED, BATCH), int(r.value(BATCH))) for r in runs
             if r.value(BATCH) is not None}
    figures = plots.write(out, summary, headline(summary), batch)
    tmp = out / (SUMMARY_MD + ".tmp")
    tmp.write_text(markdown(out, summary, status, figures))
    tmp.replace(out / SUMMARY_MD)
    return summary, status
