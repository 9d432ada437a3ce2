"""Sweeps (pipeline/sweep/, tools/sweep.py): the grid, the runs, skipping and rerunning, the summary.

The summary is checked against means and standard deviations computed here, with Python's
statistics module, from each run's own eval/metrics.json and eval/diagnostics.json."""
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SMALL, run_pipeline, training_processes

from pipeline.sweep import grid as sweep
from pipeline.sweep import summary
from pipeline.errors import UserError

TINY = ["data=digits", *SMALL]


def sweep_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "tools" / "sweep.py"), *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_grid_words_expand_in_order():
    runs = sweep.plan(["loss=rsk,margin", "seed=0,1,2", "train.ks=[1,2],[1,4]"], ["data=digits"])
    assert len(runs) == 12
    assert runs[0].words == ("loss=rsk", "seed=0", "train.ks=[1,2]")
    assert runs[1].words == ("loss=rsk", "seed=0", "train.ks=[1,4]")
    assert runs[-1].words == ("loss=margin", "seed=2", "train.ks=[1,4]")
    assert runs[0].name == "loss=rsk,seed=0,train.ks=[1_2]"  # commas separate the words only
    assert runs[0].setting == "loss=rsk train.ks=[1,2]"
    assert sweep.Run(("seed=3",)).setting == sweep.ALL
    assert sweep.args(runs[0], ["data=digits"], Path("out")) == [
        "data=digits", "loss=rsk", "seed=0", "train.ks=[1,2]", "run_dir=out/loss=rsk,seed=0,train.ks=[1_2]"]


@pytest.mark.parametrize("grid, fixed, message", [
    (["loss=rsk,nope"], [], "unknown preset loss=nope"),
    (["train.max_step=1,2"], [], "did you mean 'train.max_steps'"),
    (["train.max_steps=1,x"], [], "train.max_steps"),
    (["seed=0,1", "seed=2"], [], "given twice"),
    (["seed=0,0"], [], "distinct"),
    (["seed"], [], "not key=value1,value2"),
    (["seed=0,1"], ["seed=3"], "both in the grid and after --"),
    (["seed=0,1"], ["run_dir=x"], "run_dir is set by the sweep"),
    (["run_dir=a,b"], [], "run_dir is set by the sweep"),
    ([], ["seed=1"], "no grid words"),
])
def test_bad_grids_fail_before_anything_runs(grid, fixed, message):
    with pytest.raises(UserError, match=message):
        sweep.plan(grid, fixed)


def test_best_validation_reads_what_there_is(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert summary.best_validation(path) == {}
    lines = [{"step": 2, "time": 0.0, "name": "val/recall@1", "value": 0.5},
             {"step": 2, "time": 0.0, "name": "train/loss", "value": 0.1},
             {"step": 4, "time": 0.0, "name": "val/recall@1", "value": 0.7},
             {"step": 4, "time": 0.0, "name": "val/loss", "value": 0.3},
             {"step": 6, "time": 0.0, "name": "val/recall@1", "value": 0.6},
             {"step": 6, "time": 0.0, "name": "val/loss", "value": 0.4}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + '\n{"step": 8, "na')  # cut mid-write
    assert summary.best_validation(path) == {"best val/recall@1": 0.7, "best val/loss": 0.3}


def expected_statistics(runs: list[Path]) -> dict[str, dict]:
    """Mean, sample std and n of a few metrics of `runs`, from their own files."""
    values = {}
    for run in runs:
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        diagnostics = json.loads((run / "eval" / "diagnostics.json").read_text())
        for name, value in [*metrics["finetuned"].items(), *((f"frozen/{k}", v) for k, v in metrics["frozen"].items()),
                            ("test/rho", diagnostics["finetuned"]["test"]["rho"])]:
            if not name.split("/")[-1].startswith("num_"):
                values.setdefault(name, []).append(value)
    return {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else None, "n": len(v)}
            for k, v in values.items()}


def assert_summary(out: Path, settings: dict[str, list[str]]) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == list(settings)
    for setting, names in settings.items():
        want = expected_statistics([out / n for n in names])
        assert set(want) <= set(summary[setting]), f"{setting}: missing {set(want) - set(summary[setting])}"
        for metric, stats in want.items():
            got = summary[setting][metric]
            assert got["n"] == stats["n"] and got["mean"] == pytest.approx(stats["mean"], abs=1e-12), metric
            assert (got["std"] is None) if stats["std"] is None else got["std"] == pytest.approx(stats["std"], abs=1e-12)


def snapshot(out: Path) -> dict[str, float]:
    """Modification times of every file under the sweep's run folders."""
    return {str(p): p.stat().st_mtime_ns for p in out.glob("*/**/*") if p.is_file()}


def test_sweep_runs_each_point_skips_finished_and_reruns_a_killed_run(tmp_path):
    """data.seed fixed: the two runs have the same shards, made by the first and copied to the other. Two
    runs of one setting (the seeds) are what the rerun and the summary's mean and std need; the grouping
    by setting is tests/test_sweep_slurm.py's (a 2 x 1 grid)."""
    out = tmp_path / "sweep"
    grid = ["--out", str(out), "--jobs", "2", "seed=0,1", "--", *TINY, "data.seed=0"]
    names = ["seed=0", "seed=1"]
    victim = out / names[-1]
    proc = sweep_cli(*grid)
    deadline = time.monotonic() + 600
    while not (victim / "checkpoints" / "latest").exists():  # the last run: once it has checkpointed, kill it
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0] if proc.poll() else "timeout"
        time.sleep(0.05)
    killed = training_processes(victim)
    for rank in killed:
        rank.send_signal(signal.SIGKILL)
    status, log = finish(proc)
    assert killed and status == 1, log
    assert log.count("sweep: sharding once in") == 1 and f"sharding once in {names[0]}" in log
    shards = [{str(p.relative_to(out / n)): p.read_bytes() for p in (out / n / "shards").rglob("*") if p.is_file()}
              for n in names]
    assert shards[0] and all(s == shards[0] for s in shards)
    assert len({json.loads((out / n / "stages" / "shard.json").read_text())["run_id"] for n in names}) == 1
    assert f"{names[-1]} FAILED (exit -9)" in log and f"failed: {victim}" in log
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(names)
    assert_summary(out, {sweep.ALL: names[:1]})
    assert f"- failed: `{victim}`" in (out / "summary.md").read_text()

    status, log = finish(sweep_cli(*grid))  # the killed run again, and only it
    assert status == 0, log
    assert "2 runs in" in log and "1 already finished, 1 to run" in log and f"started {names[-1]}" in log
    assert log.count("started ") == 1
    assert_summary(out, {sweep.ALL: names})
    assert (out / "summary.png").is_file()

    before = snapshot(out)
    status, log = finish(sweep_cli(*grid))  # nothing left to run
    assert status == 0 and "2 already finished, 0 to run" in log and "started" not in log, log
    assert snapshot(out) == before, "a finished run was touched"


def test_a_run_counted_in_epochs_is_finished_as_the_runner_sees_it(tmp_path):
    """train.epochs: the runner fingerprints the stages with train.max_steps decided from the shards;
    so must runner.planned (what the preflight checks) and sweep.finished, or every finished run is
    started again (and skipped by its runner)."""
    from pipeline import runner
    from pipeline.config import load_config
    from pipeline.run_dir import RunDir
    from pipeline.train.optim import with_steps

    run, fixed = sweep.Run(("seed=0",)), [*TINY, "stage=finetune", "train.epochs=1"]
    words = sweep.args(run, fixed, tmp_path)
    run_pipeline(*words, "stage=shard")
    assert not sweep.finished(run, fixed, tmp_path)
    cfg = load_config(words)
    rd = RunDir(cfg.run_dir)
    stepped = with_steps(cfg, rd.shards)  # what the runner does once the shards exist
    assert stepped.train.max_steps != cfg.train.max_steps
    rd.mark_complete("finetune", runner.fingerprint(stepped, rd, "finetune"), run_id="test")
    assert sweep.finished(run, fixed, tmp_path)
    assert runner.planned(cfg, rd) == []  # the preflight's view too: it checks only what will run


def test_aggregate_alone_and_a_bad_command_line(tmp_path):
    for mode in ("--aggregate", "--share-shards"):
        status, log = finish(sweep_cli("--out", str(tmp_path), mode))
        assert status == 2 and "is not a sweep folder" in log
    status, log = finish(sweep_cli("--out", str(tmp_path), "loss=rsk,nope", "--", *TINY))
    assert status == 2 and log.strip().splitlines()[-1].startswith("error: unknown preset loss=nope")
    assert not (tmp_path / "loss=rsk").exists()
