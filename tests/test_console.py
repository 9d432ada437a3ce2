"""What the console shows a user: no warning they cannot act on (deprecated collectives, DeepSpeed's
accelerator line, faiss's k-means advice: those go to the log file at debug level), the force=true
message says what force=true does, and torch's CPU threads are chosen in one place."""
import dataclasses
import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pipeline import runner
from pipeline.config import load_config
from pipeline.run_context import RunContext
from pipeline.parallel import distributed
from pipeline.eval.metrics import _kmeans_assign
from pipeline.run_dir import RunDir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_threads_per_process_share_the_cores_unless_told():
    cores = len(os.sched_getaffinity(0))
    assert distributed.threads_per_process({}) == cores
    assert distributed.threads_per_process({"LOCAL_WORLD_SIZE": str(2 * cores)}) == 1
    assert distributed.threads_per_process({"SLURM_CPUS_PER_TASK": "3"}) == 3
    assert distributed.threads_per_process({"OMP_NUM_THREADS": "1", "SLURM_CPUS_PER_TASK": "3"}) is None


def test_openmp_threads_sleep_when_waiting_unless_the_user_says():
    code = "import os, pipeline.parallel.distributed; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,  # noqa: E731
                                     text=True, check=True).stdout.strip()
    assert run(env) == "PASSIVE"
    assert run({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"


def test_force_names_the_stage_it_would_rerun(tmp_path, monkeypatch, caplog):
    """stage=embed force=true reruns embed only: the skipped shard says how to rerun it, not 'force=true'."""
    cfg = load_config([f"run_dir={tmp_path}", "stage=embed", "force=true"])
    rd = RunDir(tmp_path)
    rd.mark_complete("shard", runner.fingerprint(cfg, rd, "shard"), run_id="x")
    ran = []
    monkeypatch.setattr(runner, "run_stage", lambda stage, cfg, ctx: ran.append((stage, cfg.force)))
    with caplog.at_level(logging.INFO):
        runner.run_stages(cfg, RunContext.resolve(cfg))
    assert ran == [("embed", True)]
    assert "[shard] complete, skipped (stage=shard force=true reruns it)" in caplog.messages
    caplog.clear()
    with caplog.at_level(logging.INFO):
        runner.run_stages(dataclasses.replace(cfg, force=False), RunContext.resolve(cfg))
    assert "[shard] complete, skipped (force=true reruns it)" in caplog.messages


def test_faiss_clustering_advice_is_not_printed(capfd, caplog):
    x = np.random.default_rng(0).normal(size=(180, 16)).astype(np.float32)
    with caplog.at_level(logging.DEBUG, logger="pipeline.eval.metrics"):
        assign = _kmeans_assign(x, 30, gpu=False)
    assert len(np.unique(assign)) > 1
    assert "WARNING clustering" not in capfd.readouterr().err
    assert "k-means: 180 points for 30 centroids" in caplog.text


def test_deepspeed_accelerator_lines_go_to_the_log_file(tmp_path):
    code = ("import logging, sys; from pathlib import Path; from pipeline import log; log.setup(Path(sys.argv[1]));"
            "from deepspeed.accelerator import get_accelerator; get_accelerator(); import torch.utils.cpp_extension;"
            "logging.getLogger('DeepSpeed').warning('a DeepSpeed line elsewhere')")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO}, check=True)
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr
    assert "No CUDA runtime is found" not in proc.stdout + proc.stderr
    assert "a DeepSpeed line elsewhere" in proc.stdout  # its other lines still print, through its own handler
    [line] = [l for l in (tmp_path / "rank0.log").read_text().splitlines() if "Setting accelerator" in l]
    assert " DEBUG DeepSpeed: " in line


def test_our_reduce_scatter_uses_the_current_api():
    """reduce_scatter_rows's collective is torch's current one: no FutureWarning (errors here)."""
    distributed.ensure_group(torch.device("cpu"))
    try:
        x = torch.arange(6.0).reshape(3, 2)
        share = x.new_empty(3, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            distributed.REDUCE_SCATTER(share, x)
        assert torch.equal(share, x)
        if hasattr(dist, "reduce_scatter_single"):  # the old name warns: this test can fail
            with pytest.warns(FutureWarning, match="reduce_scatter_tensor` is deprecated"):
                dist.reduce_scatter_tensor(x.new_empty(3, 2), x)
    finally:
        distributed.shutdown()


def test_a_launcher_that_started_fewer_processes_than_asked_is_named():
    """accelerate launch --num_processes 2 without --multi_gpu runs one plain process: its environment
    (as accelerate 1.x sets it) has MASTER_PORT but no WORLD_SIZE. torchrun's has WORLD_SIZE."""
    one = distributed.World()
    accelerate = {"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "no"}
    assert distributed.launcher_mismatch(one, accelerate) == []  # --num_processes 1
    [line] = distributed.launcher_mismatch(one, {**accelerate, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert "asked for several processes but this is rank 0 of 1: add --multi_gpu" in line
    torchrun = {**accelerate, "MASTER_PORT": "29500", "WORLD_SIZE": "2", "RANK": "1"}
    assert distributed.launcher_mismatch(distributed.world_from_env(torchrun), torchrun) == []
    [line] = distributed.launcher_mismatch(one, {"ACCELERATE_NUM_PROCESSES": "4"})
    assert "asked for 4 processes but this is rank 0 of 1" in line
    assert distributed.launcher_mismatch(distributed.World(0, 4), {"ACCELERATE_NUM_PROCESSES": "4"}) == []
    assert distributed.launcher_mismatch(one, {}) == []
