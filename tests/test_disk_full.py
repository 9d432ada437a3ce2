"""A full disk (a small tmpfs filled by a file) or a read-only run directory: one line saying what was
being written and what to do, no .tmp left, a bit-exact resume once space is freed; the preflight
refuses a run whose checkpoints cannot fit (pipeline/disk.py, pipeline/preflight.py)."""
import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SMALL, run_pipeline
from test_resume import same_weights

from pipeline import disk
from pipeline.parallel import checkpoint
from pipeline.errors import UserError

TRAIN = [*SMALL, "train.max_steps=40", "train.checkpoint_every=20", "train.keep_checkpoints=1", "train.log_every=1",
         "train.val_every=0", "stage=finetune"]


@pytest.fixture
def small_disk(tmp_path):
    """A 150 MB tmpfs (we are root on CI); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path, keep_free: int) -> Path:
    """A file taking all of folder's filesystem but `keep_free` bytes."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(1, disk.free_bytes(folder) - keep_free))
    return filler


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_is_one_line_and_resumes_bit_exactly(small_disk, tmp_path):
    run, alone = small_disk / "run", tmp_path / "alone"
    run_pipeline(f"run_dir={run}", *TRAIN, "train.max_steps=3")  # step_3 on disk: the checkpoint to fall back to
    proc = subprocess.Popen([sys.executable, str(REPO / "pipeline" / "run.py"), f"run_dir={run}", *TRAIN], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = run / "logs" / "rank0.log"
    while "resuming from" not in (log.read_text() if log.is_file() else ""):  # past the preflight's space check
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    filler = fill(small_disk, keep_free=300_000)  # room for the logs, not for a checkpoint (about 11 MB)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if not re.match(r"\d\d:\d\d:\d\d ", line)]  # not log lines
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: writing checkpoint step_20 ") and "failed: no space left on the device; " in lines[0]
    assert lines[0].endswith("then the same command resumes from step_3, the last complete checkpoint"), lines[0]
    assert "MB free on" in lines[0]
    assert not list(run.rglob("*.tmp")) and (run / "checkpoints" / "latest").read_text() == "step_3"
    assert "Traceback" in log.read_text()  # the full story is in the log
    filler.unlink()
    run_pipeline(f"run_dir={run}", *TRAIN)
    for steps in (3, 40):  # the same two commands with room on the disk (max_steps shapes the schedule)
        run_pipeline(f"run_dir={alone}", *TRAIN, f"train.max_steps={steps}")
    same_weights(run / "checkpoints" / "step_40", alone / "checkpoints" / "step_40", tmp_path)


def test_preflight_refuses_checkpoints_that_cannot_fit(small_disk):
    run = small_disk / "run"
    run_pipeline(f"run_dir={run}", *SMALL, "stage=shard")
    fill(small_disk, keep_free=15_000_000)  # one checkpoint (about 11 MB) fits, two do not
    result = run_pipeline(f"run_dir={run}", *TRAIN, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the checkpoints need about "), result.stderr
    assert "(2 of about " in lines[0] and "lower train.keep_checkpoints" in lines[0]
    assert not (run / "checkpoints").exists()


def test_shard_stage_on_a_full_disk_removes_its_tmp(small_disk, monkeypatch, capsys):
    """The preflight's estimate of the shards (~1 MB) passes; the disk then fills before the shard
    writer runs, so the tars meet ENOSPC: one line, shards.tmp removed, no stage marked done. On a disk
    already that full the preflight refuses, writing nothing. In process (runner.main): no start-up."""
    from test_validation import run_here

    from pipeline import preflight

    run = small_disk / "run"
    real_check, filled = preflight.check_data, []

    def check_then_fill(cfg, root):  # the disk fills between the space check and the write
        real_check(cfg, root)
        filled.append(fill(small_disk, keep_free=200_000))  # room for the config and the log, not the shards
    monkeypatch.setattr(preflight, "check_data", check_then_fill)
    assert run_here(f"run_dir={run}", *SMALL, "stage=shard") == 2 and filled
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not re.match(r"\d\d:\d\d:\d\d ", line)]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: writing the shard stage's output ")
    assert "failed: no space left on the device" in lines[0]
    assert lines[0].endswith("free some space or put run_dir on a larger disk, then run the same command again")
    assert not list(run.rglob("*.tmp")) and not (run / "shards").exists()
    assert not (run / "stages" / "shard.json").exists()
    assert "Traceback" in (run / "logs" / "rank0.log").read_text()  # the full story is in the log

    monkeypatch.setattr(preflight, "check_data", real_check)  # the same full disk, known up front: refused
    assert run_here(f"run_dir={small_disk / 'other'}", *SMALL, "stage=shard") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the shards of ") and "free some space" in lines[0], lines
    assert not (small_disk / "other").exists()


def test_read_only_and_torch_save_failures_are_recognised(tmp_path):
    """The write failures as the libraries raise them: an OSError in the chain, DCP's CheckpointException
    (a BaseException), torch.save's errno-less RuntimeError on a full disk."""
    from torch.distributed.checkpoint.api import CheckpointException

    partial = tmp_path / "step_5.tmp"
    partial.mkdir()
    with pytest.raises(disk.WriteFailed, match=r"writing checkpoint step_5 \(/x/y\) failed: the file system is "
                                               r"read-only; make .* writable or choose another run_dir, then go"):
        with disk.writing("checkpoint step_5", tmp_path, partial=partial, then="go"):
            raise CheckpointException("save", {0: (OSError(errno.EROFS, "Read-only file system", "/x/y"), None)})
    assert not partial.exists()
    with pytest.raises(RuntimeError):  # a torch.save error with room on the disk is not a full disk
        with disk.writing("x", tmp_path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    with pytest.raises(ValueError):  # nor is anything else
        with disk.writing("x", tmp_path):
            raise ValueError("no")
    assert issubclass(disk.WriteFailed, UserError)


def test_resumes_from_names_the_last_intact_checkpoint(tmp_path):
    assert "starts training over" in checkpoint.resumes_from(tmp_path)


def test_checkpoint_estimate_is_close_to_a_checkpoint(digits_run):
    from pipeline.config import load_config
    from pipeline.preflight import checkpoint_bytes
    from pipeline.run_dir import RunDir

    step = (digits_run / "checkpoints" / "latest").read_text()
    real = sum(f.stat().st_size for f in (digits_run / "checkpoints" / step).rglob("*") if f.is_file())
    estimate = checkpoint_bytes(load_config([*SMALL, f"run_dir={digits_run}"]), RunDir(digits_run))
    assert 0.9 < estimate / real < 1.1, (estimate, real)
