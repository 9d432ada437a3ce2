"""Run a grid of pipeline runs on this machine (pipeline/sweep/grid.py) and summarise them over seeds
(pipeline/sweep/summary.py).

    python tools/sweep.py --out SWEEP [--jobs N] GRID... -- key=value...
        e.g.  --out runs/losses loss=rsk,margin seed=0,1,2 -- data=glyphs train.max_steps=300
    python tools/sweep.py --out SWEEP --aggregate      only (re)write SWEEP/summary.{json,md} and the plots

One run directory per grid point, SWEEP/<its words joined by commas>; N runs at a time (default 1);
finished runs are skipped, so after a crash or a kill the same command runs what is missing (a
killed run resumes from its last checkpoint). Runs with the same shard settings (e.g. seeds with
data.seed fixed) shard once and copy. Each run's output goes to SWEEP/<run>/sweep.log.
Exit status 1 when a run failed (the summary still covers the others), 2 for a bad command line.
A run that another command or Slurm job is running (its run_dir/.lock is held) is skipped with a line.

For slurm/sweep.sh:  --plan GRID... -- ...  writes the plan and prints the numbers of the runs not yet
finished (comma-separated); --share-shards shards once for each group of the planned runs that shard
the same data (the job before the array); --args I prints run I's pipeline/run.py arguments, NUL-separated
(exit status 3 and a line if the run is running elsewhere).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from pipeline.sweep import grid as sweep  # noqa: E402
from pipeline.sweep import summary as sweep_summary  # noqa: E402
from pipeline.errors import UserError  # noqa: E402

RUNNING = 3  # --args: the run is being written by another process (its line on stderr)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], list[str]]:
    words, fixed = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the sweep folder")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--aggregate", action="store_true", help="only write the summary of the planned runs")
    mode.add_argument("--plan", action="store_true", help="write the plan; print the unfinished runs' numbers")
    mode.add_argument("--args", type=int, metavar="I", help="print run I's arguments, NUL-separated")
    mode.add_argument("--share-shards", action="store_true", help="shard once for the planned runs with the same data")
    options, grid = parser.parse_known_args(words)
    unknown = [w for w in grid if w.startswith("-")]
    if unknown:
        parser.error(f"unknown option {unknown[0]}")
    if options.jobs < 1:
        parser.error("--jobs must be at least 1")
    return options, grid, fixed


def start(run: sweep.Run, fixed: list[str], out: Path, env: dict, *extra: str) -> subprocess.Popen:
    folder = out / run.name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "sweep.log", "ab") as log:
        return subprocess.Popen([sys.executable, str(REPO / "pipeline" / "run.py"), *sweep.args(run, fixed, out), *extra],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def shard_first(run: sweep.Run, fixed: list[str], out: Path) -> bool:
    """The shard stage of `run` alone, for the runs that share its shards (pipeline.sweep.share_shards)."""
    print(f"sweep: sharding once in {run.name} for the runs with the same data", flush=True)
    return start(run, fixed, out, dict(os.environ), "stage=shard").wait() == 0


def share_shards(runs: list[sweep.Run], todo: list[sweep.Run], fixed: list[str], out: Path) -> None:
    """The runs to do that shard the same data shard once, the first of each group alone (shard_first)."""
    sweep.share_shards(runs, todo, fixed, out, lambda run: shard_first(run, fixed, out))


def run_all(runs: list[sweep.Run], fixed: list[str], out: Path, jobs: int) -> None:
    """Run `runs`, `jobs` at a time, saying how each ended."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    todo, running = list(runs), {}
    try:
        while todo or running:
            while todo and len(running) < jobs:
                run = todo.pop(0)
                running[run] = (start(run, fixed, out, env), time.monotonic())
                print(f"sweep: started {run.name}", flush=True)
            time.sleep(0.2)
            for run, (proc, began) in list(running.items()):
                if proc.poll() is not None:
                    del running[run]
                    ok = proc.returncode == 0
                    print(f"sweep: {run.name} {'finished' if ok else f'FAILED (exit {proc.returncode})'} in "
                          f"{time.monotonic() - began:.0f} s" + ("" if ok else f"; see {out / run.name / 'sweep.log'}"),
                          flush=True)
    finally:
        for proc, _ in running.values():  # interrupted: the runs checkpoint and stop (SIGTERM), resumed next time
            proc.terminate()
        for proc, _ in running.values():
            proc.wait()


def main(argv: list[str]) -> int:
    options, grid, fixed = parse(argv)
    out: Path = options.out.resolve()  # the runs start in the repository: a relative path would move
    try:
        if options.aggregate or options.share_shards or options.args is not None:
            if grid or fixed:
                raise UserError("--aggregate, --share-shards and --args read the planned sweep: give no grid words")
            fixed, runs = sweep.load_plan(out)
            if options.share_shards:
                todo = sweep.idle([r for r in runs if not sweep.finished(r, fixed, out)], out, say)
                share_shards(runs, todo, fixed, out)
                return 0
            if options.args is not None:
                if not 0 <= options.args < len(runs):
                    raise UserError(f"--args {options.args}: the sweep in {out} has runs 0 to {len(runs) - 1}")
                if not sweep.idle([runs[options.args]], out, say):
                    return RUNNING  # slurm/sweep_task.sh ends the task: the run is another job's
                sys.stdout.write("\0".join(sweep.args(runs[options.args], fixed, out)))
                return 0
        else:
            runs = sweep.plan(grid, fixed)
            out.mkdir(parents=True, exist_ok=True)
            sweep.save_plan(out, grid, fixed, runs)
            todo = sweep.idle([r for r in runs if not sweep.finished(r, fixed, out)], out, say)
            if options.plan:
                print(",".join(str(runs.index(r)) for r in todo))
                return 0
            print(f"sweep: {len(runs)} runs in {out}, {len(runs) - len(todo)} already finished, "
                  f"{len(todo)} to run, {options.jobs} at a time", flush=True)
            share_shards(runs, todo, fixed, out)
            run_all(todo, fixed, out, options.jobs)
        summary, status = sweep_summary.aggregate(out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sweep: {len(status['finished'])}/{len(runs)} runs finished; summary in {out / sweep.SUMMARY_MD}")
    for state in ("failed", "not started"):
        for run in status[state]:
            print(f"sweep: {state}: {out / run.name}")
    return 0 if len(status["finished"]) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
