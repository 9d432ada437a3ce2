"""One writer per run directory (pipeline/run_lock.py): a second command fails in one line naming the
first, touching nothing; a killed holder leaves no lock; sweeps skip a run that is running."""
import errno
import fcntl
import filecmp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SMALL, run_pipeline, run_torchrun

from pipeline import run_lock
from pipeline.sweep import grid as sweep
from pipeline.errors import UserError

HOLD = "import sys, time; from pipeline import run_lock; run_lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def hold(run_dir: Path) -> subprocess.Popen:
    """Another process holding run_dir's lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "17"})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_acquire_names_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path):
    proc = hold(tmp_path)
    try:
        info = run_lock.holder(tmp_path)
        assert info["pid"] == proc.pid and info["slurm_job"] == "17" and info["command"].startswith("-c ")
        with pytest.raises(UserError, match=rf"{tmp_path} is in use by pid {proc.pid} on \S+ \(Slurm job 17, since "):
            run_lock.acquire(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert run_lock.holder(tmp_path) is None  # the kernel dropped the flock with the process
    lock = run_lock.acquire(tmp_path)
    assert run_lock.holder(tmp_path)["pid"] == os.getpid()
    lock.release()


def test_a_filesystem_without_flock_is_reported_with_the_opt_out(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(UserError, match="file locks do not work .*set lock=false"):
        run_lock.acquire(tmp_path)


def test_read_only_stages_need_no_lock():
    assert run_lock.needs_lock("finetune") and run_lock.needs_lock("eval") and not run_lock.needs_lock("plan")


def test_second_writer_fails_in_one_line_and_the_first_runs_as_if_alone(tmp_path):
    """A shard-stage rerun started while a finetune writes the same run_dir (the issue's race) ends at once,
    exit 2, one line naming the finetune's pid; the finetune's shards equal those of a shard run alone."""
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    first = subprocess.Popen([sys.executable, str(REPO / "pipeline" / "run.py"), "stage=finetune", f"run_dir={shared}",
                              *SMALL, "train.max_steps=200", "train.checkpoint_every=100"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while run_lock.holder(shared) is None:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.2)
        second = run_pipeline("stage=shard", "force=true", f"run_dir={shared}", *SMALL, check=False)
        assert first.poll() is None, "the first run ended before the second tried: the test proves nothing"
    finally:
        first.send_signal(signal.SIGTERM)  # checkpoints and stops
        first.wait(timeout=300)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {shared} is in use by pid {first.pid} on "), second.stderr
    run_pipeline("stage=shard", f"run_dir={alone}", *SMALL)
    for split in ("train", "test"):
        names = sorted(p.name for p in (shared / "shards" / split).iterdir())
        assert names == sorted(p.name for p in (alone / "shards" / split).iterdir())
        _, mismatch, errors = filecmp.cmpfiles(shared / "shards" / split, alone / "shards" / split, names, shallow=False)
        assert not mismatch and not errors


def test_every_rank_fails_together_under_torchrun(tmp_path):
    proc = hold(tmp_path)
    try:
        result = run_torchrun(2, "stage=shard", f"run_dir={tmp_path}", *SMALL, check=False)
    finally:
        proc.kill()
        proc.wait()
    assert result.returncode != 0
    assert f"is in use by pid {proc.pid}" in result.stderr
    assert not (tmp_path / "shards").exists() and not (tmp_path / "logs").exists()  # nothing touched


def test_lock_false_runs_beside_a_holder(tmp_path):
    proc = hold(tmp_path)
    try:
        run_pipeline("stage=shard", f"run_dir={tmp_path}", "lock=false", *SMALL)
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / "stages" / "shard.json").is_file()


def test_sweep_skips_a_run_that_is_running(tmp_path):
    runs = sweep.plan(["seed=0,1"], [])
    proc = hold(tmp_path / runs[1].name)
    lines = []
    try:
        assert sweep.idle(runs, tmp_path, lines.append) == [runs[0]]
        sweep.save_plan(tmp_path, ["seed=0,1"], [], runs)
        task = subprocess.run([sys.executable, str(REPO / "tools" / "sweep.py"), "--out", str(tmp_path), "--args", "1"],
                              capture_output=True, text=True, cwd=REPO)
    finally:
        proc.kill()
        proc.wait()
    assert len(lines) == 1 and lines[0].startswith(f"sweep: skipped {runs[1].name}: already running, by pid {proc.pid} on ")
    assert "(Slurm job 17, since " in lines[0]
    assert task.returncode == 3 and task.stdout == "" and "sweep: skipped seed=1: already running" in task.stderr
