"""Sweeps: a grid of pipeline runs in one folder, and their summary over seeds.

    grid words   `loss=rsk,margin seed=0,1,2`: a preset group or a dotted key, its values split on the
                 commas outside brackets (`train.ks=[1,2],[1,4]` is two values)
    runs         one per grid point (the product of the words, the first word slowest), each a run
                 directory SWEEP/<its words joined by commas>, run with the fixed `key=value` words
                 plus its own; the plan is saved in SWEEP/sweep.json so that other processes (a Slurm
                 array task, the aggregation job) read the same runs
    finished     every requested stage of the run is complete for these settings (the runner's own
                 completion markers), so a finished run is skipped and a killed one run again
    shared       runs whose shard stage has the same settings shard once (tools/sweep.py): the others
                 copy the shards and the stage's marker
    summary      for each setting (a grid point without its seed, its words joined by spaces), the
                 mean, sample standard deviation and n of every metric of the finished runs:
                 SWEEP/summary.json, SWEEP/summary.md (with the runs that did not finish), and plots

Metric names, from each run directory: `eval/metrics.json`'s metrics of the finetuned model by their
own names (`recall@1`), other models' with the model in front (`frozen/recall@1`), evaluations of
protocols with several in between (`test800/recall@1`); `eval/diagnostics.json`'s as
`<split>/<name>` (`test/rho`, `frozen/test/pi_ratio`); and from `logs/metrics.jsonl` (the training
scalars, when the run logged validation) the best value of every `val/...` scalar, as
`best val/recall@1` (the highest; the lowest for a loss).
"""
from __future__ import annotations

import itertools
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import run_lock
from pipeline.config import Config, load_config
from pipeline.errors import UserError
from pipeline.run_dir import RunDir, replace_dir, write_json

SEED, BATCH = "seed", "train.global_batch"
PLAN, SUMMARY_JSON, SUMMARY_MD = "sweep.json", "summary.json", "summary.md"
ALL = "all"  # the setting's name when the grid sweeps nothing but the seed


@dataclass(frozen=True)
class Run:
    words: tuple[str, ...]          # the grid point, e.g. ("loss=rsk", "seed=0")

    @property
    def name(self) -> str:
        """Its folder: the words joined by commas, characters unsafe in a path replaced."""
        return ",".join(re.sub(r"[^A-Za-z0-9._=+\-\[\]]", "_", w) for w in self.words)

    @property
    def setting(self) -> str:
        return self.setting_without(SEED)

    def setting_without(self, *keys: str) -> str:
        return " ".join(w for w in self.words if _key(w) not in keys) or ALL

    def value(self, key: str) -> str | None:
        return next((w.split("=", 1)[1] for w in self.words if _key(w) == key), None)


def _key(word: str) -> str:
    return word.split("=", 1)[0]


def split_values(text: str) -> list[str]:
    """`a,b,[1,2]` -> ['a', 'b', '[1,2]']: commas inside brackets belong to the value."""
    values, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(c, 0)
        if c == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return values


def parse_grid(words: list[str]) -> list[tuple[str, list[str]]]:
    """Grid words -> [(key, values)]: key=v1,v2,..., each key once (keys and values are checked by plan)."""
    grid = []
    for word in words:
        key, sep, values = word.partition("=")
        if not sep or not key or not values:
            raise UserError(f"grid word '{word}' is not key=value1,value2,... (e.g. loss=rsk,margin seed=0,1,2)")
        if key == "run_dir":
            raise UserError("run_dir is set by the sweep (--out SWEEP, one folder per run): leave it out")
        if key in (k for k, _ in grid):
            raise UserError(f"grid key '{key}' is given twice; list all its values in one word: {key}=a,b")
        values = split_values(values)
        if any(not v for v in values) or len(set(values)) < len(values):
            raise UserError(f"grid word '{word}': values must be distinct and non-empty")
        grid.append((key, values))
    return grid


def plan(grid_words: list[str], fixed: list[str]) -> list[Run]:
    """The runs of a sweep, each checked to be a valid pipeline command (before anything runs)."""
    grid = parse_grid(grid_words)
    if not grid:
        raise UserError("no grid words: give at least one key=value1,value2,... before --")
    keys = [k for k, _ in grid]
    for word in fixed:
        key = _key(word)
        if key == "run_dir":
            raise UserError("run_dir is set by the sweep (--out SWEEP, one folder per run): leave it out")
        if key in keys:
            raise UserError(f"'{key}' is both in the grid and after --: give it in one place")
    runs = [Run(tuple(f"{k}={v}" for k, v in zip(keys, point))) for point in itertools.product(*(v for _, v in grid))]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        raise UserError("two grid points give the same folder name; use values that differ in letters or digits")
    for run in runs:
        load_config(args(run, fixed, Path(".")))  # one clear line for a bad key or value, now
    return runs


def args(run: Run, fixed: list[str], out: Path) -> list[str]:
    """The pipeline/run.py arguments of one run."""
    return [*fixed, *run.words, f"run_dir={Path(out) / run.name}"]


def save_plan(out: Path, grid_words: list[str], fixed: list[str], runs: list[Run]) -> None:
    write_json(Path(out) / PLAN, {"grid": grid_words, "fixed": fixed, "runs": [list(r.words) for r in runs]})


def load_plan(out: Path) -> tuple[list[str], list[Run]]:
    """(fixed words, runs) of the sweep planned in `out`."""
    path = Path(out) / PLAN
    if not path.is_file():
        raise UserError(f"{path} does not exist: {out} is not a sweep folder (run tools/sweep.py --out {out} GRID...)")
    data = json.loads(path.read_text())
    return data["fixed"], [Run(tuple(words)) for words in data["runs"]]


def finished(run: Run, fixed: list[str], out: Path) -> bool:
    """Whether every stage the run asks for is complete with its settings (as the runner would skip them)."""
    from pipeline import runner  # here: the runner imports the training side(torch)

    cfg: Config = load_config(args(run, fixed, out))
    rd = RunDir(cfg.run_dir)
    stages, todo = set(), list(runner.ALL if cfg.stage == "all" else (cfg.stage,))
    while todo:
        stage = todo.pop()
        if stage not in stages:
            stages.add(stage)
            todo += runner.requires(stage, cfg)
    return all(rd.is_complete(s, runner.fingerprint(cfg, rd, s)) for s in stages)


def idle(runs: list[Run], out: Path, say: Callable[[str], None]) -> list[Run]:
    """The runs no process is writing now (pipeline/run_lock.py); `say` gets a line for each one skipped
    (a sweep resubmitted while its earlier array or command still runs it)."""
    free = []
    for run in runs:
        held = run_lock.holder(Path(out) / run.name)
        if held is None:
            free.append(run)
        else:
            say(f"sweep: skipped {run.name}: already running, by {run_lock.describe(held)}")
    return free


def _stage_state(run: Run, fixed: list[str], out: Path, stage: str) -> tuple[str, bool]:
    """(the stage's settings as a key, whether the run has that stage complete with them)."""
    from pipeline import runner

    cfg = load_config(args(run, fixed, out))
    rd = RunDir(cfg.run_dir)
    fp = runner.fingerprint(cfg, rd, stage)
    return json.dumps(fp["settings"], sort_keys=True), rd.is_complete(stage, fp)


def share_shards(runs: list[Run], todo: list[Run], fixed: list[str], out: Path, shard: Callable[[Run], bool]) -> None:
    """Runs to do that shard the same data (equal shard-stage settings: a grid over seeds with data.seed
    fixed, or over training settings alone) share one sharding: a run of the group that has it (or
    else the first, sharded now by `shard(run)`, False if that failed) gives the others a copy of its
    shards and completion marker, so that their shard stage counts as done."""
    groups: dict[str, list[tuple[Run, bool]]] = {}
    for run in runs:
        key, done = _stage_state(run, fixed, out, "shard")
        groups.setdefault(key, []).append((run, done))
    for members in groups.values():
        waiting = [r for r, done in members if not done and r in todo]
        if len(members) < 2 or not waiting:
            continue
        donor = next((r for r, done in members if done), None)
        if donor is None:
            donor = waiting.pop(0)
            if not shard(donor):
                continue  # the runs shard for themselves (and fail, if they must, with their own logs)
        for run in waiting:
            _copy_shards(Path(out) / donor.name, Path(out) / run.name)


def _copy_shards(donor: Path, run_dir: Path) -> None:
    try:
        lock = run_lock.acquire(run_dir)  # a writer of the run directory like any other
    except UserError as e:
        print(f"sweep: shards not copied: {e}", flush=True)
        return
    try:
        _copy_shards_locked(donor, run_dir)
    finally:
        lock.release()


def _copy_shards_locked(donor: Path, run_dir: Path) -> None:
    source, target = RunDir(donor), RunDir(run_dir)
    tmp = target.root / "shards.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(source.shards, tmp)
    replace_dir(tmp, target.shards)
    target.marker("shard").parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source.marker("shard"), target.marker("shard"))  # written last: the copy is whole


# ---- aggregation ----------------------------------------------------------------------------------

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
    from pipeline import sweep_plots  # matplotlib only when writing

    out = Path(out)
    summary, status = summarise(out)
    write_json(out / SUMMARY_JSON, summary)
    _, runs = load_plan(out)
    batch = {r.setting: (r.setting_without(SEED, BATCH), int(r.value(BATCH))) for r in runs
             if r.value(BATCH) is not None}
    figures = sweep_plots.write(out, summary, headline(summary), batch)
    tmp = out / (SUMMARY_MD + ".tmp")
    tmp.write_text(markdown(out, summary, status, figures))
    tmp.replace(out / SUMMARY_MD)
    return summary, status
