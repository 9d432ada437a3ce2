"""Stopping and resuming: the data position and RNG states in a checkpoint, a truncated checkpoint,
preemption by a stop file or a signal (every rank stops at the same step), and the Slurm requeue."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from conftest import REPO, SMALL, run_pipeline, training_processes
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from pipeline.config import TrainConfig
from pipeline.data.loader import train_loader
from pipeline.data.sampler import PKSampler
from pipeline.data.shards import ShardIndex
from pipeline.parallel import checkpoint
from pipeline.parallel.engine import Engine
from pipeline.parallel.preemption import EXIT_STATUS, StopRequest
from pipeline.train.optim import build_optimizer


def same_weights(step_a, step_b, tmp_path) -> None:
    dcp_to_torch_save(step_a, tmp_path / "a.pt")
    dcp_to_torch_save(step_b, tmp_path / "b.pt")
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in b["model"].items():
        assert torch.equal(a["model"][name], tensor), name


def fresh_finetune(digits_run, run):
    """A copy of the shared digits run as it was before finetuning: shards and embeddings only."""
    shutil.copytree(digits_run, run, ignore=shutil.ignore_patterns("checkpoints", "export", "eval"))
    for stage in ("finetune", "export", "eval"):
        (run / "stages" / f"{stage}.json").unlink()


def test_resumed_loader_continues_with_the_same_samples(digits_run):
    """The data position is the step: a loader started at step 3 (on 1 or 2 ranks) gives exactly
    the images and labels that an uninterrupted one gives from step 3 on, none repeated or skipped."""
    index = ShardIndex.load(digits_run / "shards" / "train")
    sampler = PKSampler(index.labels, 16, 4, seed=0)
    transform = lambda image: torch.as_tensor(np.asarray(image, dtype=np.float32))  # noqa: E731
    straight = list(train_loader(index, transform, sampler, 0, 6))
    resumed = list(train_loader(index, transform, sampler, 3, 6))
    halves = [list(train_loader(index, transform, sampler, 3, 6, rank=r, world_size=2)) for r in range(2)]
    for step in range(3):
        images, labels = straight[3 + step]
        assert torch.equal(resumed[step][0], images) and torch.equal(resumed[step][1], labels)
        assert torch.equal(torch.cat([halves[0][step][0], halves[1][step][0]]), images)


def test_rng_states_are_restored(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    model = torch.nn.Linear(3, 2)
    engine = Engine(model, *build_optimizer(model, TrainConfig()), torch.device("cpu"))
    checkpoint.save(tmp_path, 1, engine, {"model": {}}, keep=2)
    after_save = torch.rand(4), np.random.rand(2)
    torch.manual_seed(2)
    np.random.seed(2)
    checkpoint.load(checkpoint.latest(tmp_path), engine, expect_model={})
    assert torch.equal(torch.rand(4), after_save[0]) and np.array_equal(np.random.rand(2), after_save[1])


def test_truncated_checkpoint_falls_back_to_the_previous_one(digits_run, tmp_path):
    """A crash while step_6 was being written out (a file cut short): resume warns, takes step_3,
    and ends bit-identical to the run that never stopped."""
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    (run / "stages" / "finetune.json").unlink()
    shard = max((run / "checkpoints" / "step_6").glob("*.distcp"), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:1000])
    (run / "checkpoints" / "step_9.tmp").mkdir()  # an unfinished one, never published: ignored
    proc = run_pipeline("stage=finetune", f"run_dir={run}", *SMALL)
    assert f"checkpoint step_6 is unusable ({shard.name} has 1000 bytes" in proc.stderr
    assert "resuming from" in proc.stderr and "step_3" in proc.stderr and "step 6/6" in proc.stderr
    same_weights(run / "checkpoints" / "step_6", digits_run / "checkpoints" / "step_6", tmp_path)


def fake_scontrol(tmp_path):
    """An `scontrol` that records its arguments, first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_stop_file_checkpoints_requeues_and_resumes(digits_run, tmp_path, monkeypatch):
    """Under Slurm (a fake scontrol): the stop file ends the run after its first step with a
    checkpoint, the job is requeued, no later stage runs; running again ends as if never stopped."""
    run = tmp_path / "run"
    fresh_finetune(digits_run, run)
    stop_file = tmp_path / "stop"
    stop_file.touch()
    for key, value in {"PIPELINE_STOP_FILE": str(stop_file), "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "0",
                       "PATH": fake_scontrol(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    proc = run_pipeline("stage=all", f"run_dir={run}", *SMALL, check=False)
    assert proc.returncode == EXIT_STATUS, proc.stderr[-3000:]
    assert "Slurm job 4242, SLURM_RESTART_COUNT=0" in proc.stderr
    assert f"preempted after step 1 (stop file {stop_file}): checkpoint saved" in proc.stderr
    assert "requeued Slurm job 4242" in proc.stderr
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    assert (run / "checkpoints" / "latest").read_text() == "step_1" and not stop_file.exists()
    assert not (run / "stages" / "finetune.json").exists() and not (run / "export").exists()

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    proc = run_pipeline("stage=finetune", f"run_dir={run}", *SMALL)
    assert "SLURM_RESTART_COUNT=1" in proc.stderr and "resuming from" in proc.stderr
    same_weights(run / "checkpoints" / "step_6", digits_run / "checkpoints" / "step_6", tmp_path)


def test_signal_sets_the_request(tmp_path):
    with StopRequest(env={}) as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested() and stop.reason == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers put back


def wait_for_step(proc: subprocess.Popen, log, step: int) -> None:
    """Until the run's log shows `step` done (the run must still be going)."""
    deadline = time.monotonic() + 300
    while not (log.is_file() and f"step {step}/" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)


def test_signal_to_one_rank_stops_all_at_the_same_step(digits_run, tmp_path):
    """SIGUSR1 to rank 1 of 2 (DDP): both ranks finish the step, write one checkpoint together, stop."""
    run = tmp_path / "run"
    fresh_finetune(digits_run, run)
    steps = [*SMALL, "train.max_steps=200", "train.log_every=1", "parallel=ddp"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen([*launcher, str(REPO / "pipeline" / "run.py"), "stage=finetune", f"run_dir={run}", *steps],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = run / "logs" / "rank1.log"
    wait_for_step(proc, log, 2)
    rank1 = [p for p in training_processes(run) if p.environ().get("RANK") == "1"]
    assert len(rank1) == 1, f"expected one process of rank 1, found {rank1}"
    rank1[0].send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0 and f"exitcode  : {EXIT_STATUS}" in stderr, stderr[-3000:]
    stopped = (run / "checkpoints" / "latest").read_text()
    step = int(stopped[5:])
    assert 2 <= step < 200 and json.loads((run / "checkpoints" / stopped / "meta.json").read_text())["step"] == step
    assert f"preempted after step {step} (SIGUSR1)" in log.read_text()
    assert f"preempted after step {step} (another rank was signalled)" in (run / "logs" / "rank0.log").read_text()


def test_sigterm_to_every_process_with_loader_workers(digits_run, tmp_path):
    """Slurm signals every process of a job step, DataLoader workers included: they leave the stop to
    the main process, which finishes the step and checkpoints instead of dying with its workers."""
    run = tmp_path / "run"
    fresh_finetune(digits_run, run)
    proc = subprocess.Popen([sys.executable, str(REPO / "pipeline" / "run.py"), "stage=finetune", f"run_dir={run}",
                             *SMALL, "train.max_steps=200", "train.log_every=1", "data.workers=2"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = run / "logs" / "rank0.log"
    wait_for_step(proc, log, 2)
    os.killpg(proc.pid, signal.SIGTERM)  # the process group: the main process and its 2 workers
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_STATUS, stderr[-3000:]
    step = int((run / "checkpoints" / "latest").read_text()[5:])
    assert f"preempted after step {step} (SIGTERM): checkpoint saved" in stderr
