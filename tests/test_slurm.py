"""The slurm/ job scripts on a real Slurm cluster (tools/local_slurm.sh starts one on this machine, CI
does so in .ci/run): `sbatch slurm/finetune_vitg.sh model=tiny data=digits` with 2 processes matches a
plain run; preempted with SIGUSR1 it checkpoints, requeues itself and resumes to the same weights;
killed with SIGKILL, the same job submitted again resumes to them; pipeline.sh chains the stages.

Without a reachable controller these tests skip, saying why; with REQUIRE_SLURM=1 (CI) they fail."""
import json
import os
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SMALL, training_processes
from test_parallel import exported_weights_close

# This node's size instead of the scripts' GPU nodes; NPROC_PER_NODE=2 below: 2 gloo processes.
ON_THIS_NODE = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=00:20:00"]
# recipe=none: the job scripts pass recipe=rsk, and the jobs are compared with plain runs.
TINY = ["model=tiny", "data=digits", "recipe=none", *SMALL]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
WAIT_S = 900  # a job waits behind any other job on the node (the suite may run twice at once)


START = "start a local cluster with: sudo bash tools/local_slurm.sh"


@lru_cache(maxsize=1)
def slurm_unreachable() -> str | None:
    """Why Slurm cannot be used here, or None (asked once: without a controller sinfo takes seconds)."""
    try:
        proc = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        return f"Slurm is not installed ({START})"
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer within 20 s: no Slurm configuration? ({START})"
    if proc.returncode != 0:
        return f"no Slurm controller answers ({proc.stderr.strip()}); {START}"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm():
    reason = slurm_unreachable()
    if reason and os.environ.get("REQUIRE_SLURM") == "1":
        pytest.fail(f"REQUIRE_SLURM=1 but {reason}")
    if reason:
        pytest.skip(reason)


def user_env(**extra: str) -> dict:
    """A user's shell with this Python's environment activated; 2 processes per node."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "2", **extra}


def sbatch(script: str, output: Path, *args: str, env: dict | None = None) -> str:
    """Submit slurm/<script> as a user would; the job id."""
    proc = subprocess.run(["sbatch", "--parsable", *ON_THIS_NODE, f"--output={output}", str(REPO / "slurm" / script),
                           *args], cwd=REPO, env=env or user_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch {script} failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job(job_id: str) -> dict:
    """`scontrol show job` as a dict (accounting is off on the test cluster, so no sacct)."""
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True,
                         timeout=30).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_until(condition, what: str, job_id: str, output: Path, timeout: float = WAIT_S, every: float = 0.05) -> None:
    """Poll `condition` every `every` s (files often, to catch a checkpoint mid-training; Slurm less)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = output.read_text()[-4000:] if output.exists() else "(no output yet)"
            pytest.fail(f"job {job_id}: no {what} after {timeout:.0f} s (state {job(job_id).get('JobState')}):\n{tail}")
        time.sleep(every)


def wait_for_end(job_id: str, output: Path) -> dict:
    wait_until(lambda: job(job_id).get("JobState") in ENDED, "end", job_id, output, every=0.5)
    return job(job_id)


def same_weights(run: Path, reference: Path) -> None:
    got, ref = load_file(run / "export" / "model.safetensors"), load_file(reference / "export" / "model.safetensors")
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref), "the weights differ from the uninterrupted job's"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """One uninterrupted finetune_vitg.sh job, small: ZeRO-3 over 2 processes, 6 steps."""
    tmp = tmp_path_factory.mktemp("slurm_straight")
    job_id = sbatch("finetune_vitg.sh", tmp / "job.out", f"run_dir={tmp / 'run'}", *TINY)
    info = wait_for_end(job_id, tmp / "job.out")
    assert info["JobState"] == "COMPLETED", f"job {job_id} {info['JobState']}:\n{(tmp / 'job.out').read_text()[-4000:]}"
    return tmp


def test_finetune_vitg_job_matches_a_plain_run(straight, digits_run):
    log = (straight / "job.out").read_text()
    assert "1 node(s) x 2 process(es), torchrun" in log and "launch: pipeline/run.py exited with status 0" in log
    meta = json.loads((straight / "run" / "checkpoints" / "step_6" / "meta.json").read_text())
    assert (meta["format"], meta["parallel"], meta["world_size"]) == ("deepspeed", "zero3", 2)
    exported_weights_close(straight / "run", digits_run)


@pytest.mark.slow
def test_accelerate_launch_fsdp2_job_matches_a_plain_run(digits_run, tmp_path):
    job_id = sbatch("finetune_vitg.sh", tmp_path / "job.out", f"run_dir={tmp_path / 'run'}", "parallel=fsdp2", *TINY,
                    env=user_env(LAUNCHER="accelerate"))
    assert wait_for_end(job_id, tmp_path / "job.out")["JobState"] == "COMPLETED", (tmp_path / "job.out").read_text()
    assert "1 node(s) x 2 process(es), accelerate" in (tmp_path / "job.out").read_text()
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_6" / "meta.json").read_text())
    assert (meta["format"], meta["parallel"], meta["world_size"]) == ("dcp", "fsdp2", 2)
    exported_weights_close(tmp_path / "run", digits_run)


def test_killed_job_resumes_when_submitted_again(straight, tmp_path):
    run, output = tmp_path / "run", tmp_path / "job.out"
    job_id = sbatch("finetune_vitg.sh", output, f"run_dir={run}", *TINY)
    wait_until(lambda: (run / "checkpoints" / "latest").exists(), "checkpoint", job_id, output)
    ranks = training_processes(run)
    assert len(ranks) == 2, f"expected 2 training processes, found {ranks}"
    for rank in ranks:
        rank.kill()  # SIGKILL
    assert wait_for_end(job_id, output)["JobState"] == "FAILED"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_3", "the kill came after training ended"
    assert not (run / "export" / "model.safetensors").exists()

    again = sbatch("finetune_vitg.sh", output, f"run_dir={run}", *TINY)
    assert wait_for_end(again, output)["JobState"] == "COMPLETED", output.read_text()[-4000:]
    assert "resuming from" in output.read_text().split(f"launch: job {again}")[1]
    same_weights(run, straight / "run")


def test_preempted_job_checkpoints_requeues_and_resumes(straight, tmp_path):
    """SIGUSR1 to the batch shell, as `#SBATCH --signal=B:USR1@120` sends it before the time limit.
    The ranks are paused meanwhile, so that the signal arrives mid-training however fast the steps go."""
    run, output = tmp_path / "run", tmp_path / "job.out"
    job_id = sbatch("finetune_vitg.sh", output, f"run_dir={run}", *TINY)
    wait_until(lambda: (run / "checkpoints" / "latest").exists(), "checkpoint", job_id, output)
    ranks = training_processes(run)
    assert len(ranks) == 2, f"expected 2 training processes, found {ranks}"
    for rank in ranks:
        rank.suspend()
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=30)
    wait_until(lambda: (run / f"stop.{job_id}.0").exists(), "stop file", job_id, output, timeout=60)
    for rank in ranks:
        rank.resume()

    info = wait_for_end(job_id, output)
    log = output.read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), log[-4000:]
    first, second = log.split(f"launch: job {job_id} (restart 1)")
    assert "preempted after step" in first and f"requeued Slurm job {job_id}" in first
    assert "SLURM_RESTART_COUNT=1" in second and "resuming from" in second
    same_weights(run, straight / "run")


@pytest.mark.slow
def test_pipeline_sh_chains_the_stages(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(["bash", "slurm/pipeline.sh", *ON_THIS_NODE, f"--output={tmp_path}/%x-%j.out",
                           f"run_dir={run}", *TINY], cwd=REPO, env=user_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    ids = dict(line.split() for line in proc.stdout.splitlines())
    assert set(ids) == {"embed", "finetune", "eval"}
    assert job(ids["eval"])["Dependency"].startswith(f"afterok:{ids['finetune']}")
    info = wait_for_end(ids["eval"], tmp_path / f"eval-{ids['eval']}.out")
    assert info["JobState"] == "COMPLETED", "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("*.out"))
    assert all(job(ids[s])["JobState"] == "COMPLETED" for s in ("embed", "finetune"))
    assert set(json.loads((run / "eval" / "metrics.json").read_text())) == {"frozen", "finetuned"}
