"""Running a grid: its runs (one run directory each), the plan shared with Slurm array tasks, which runs
are finished or held elsewhere, and shards made once per group of runs that shard the same data
(the grid words and the plan: pipeline/sweep/__init__.py)."""
from __future__ import annotations

import itertools
import json
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

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
    """Whether every stage the run asks for is complete with its settings: the runner would run none
    of them (a force=true among the sweep's words aside, as before)."""
    from pipeline import runner  # here: the runner imports the training side(torch)

    cfg: Config = load_config(args(run, fixed, out))
    return not runner.planned(replace(cfg, force=False), RunDir(cfg.run_dir))


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
