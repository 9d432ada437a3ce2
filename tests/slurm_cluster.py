"""The local Slurm cluster the Slurm tests submit to (tools/local_slurm.sh; CI starts it with NODES=2):
reaching it, submitting the slurm/ scripts as a user would, waiting for jobs, and failing a node.

Without a reachable controller (or with fewer nodes than a test needs) the tests skip, saying why;
with REQUIRE_SLURM=1 (CI) they fail instead."""
import os
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import psutil
import pytest
from conftest import REPO

START = "start a local cluster with: NODES=2 bash tools/local_slurm.sh (as root)"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Pending reasons that never clear by themselves (the job asks for more than the cluster has).
NEVER = {"PartitionConfig", "BadConstraints", "PartitionNodeLimit"}
WAIT_S = 900  # a job waits behind any other job on the nodes (the suite may run twice at once)
# This machine's nodes instead of the scripts' GPU nodes, gloo on the CPU.
TWO_NODES = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2", "--time=00:20:00"]  # x 1 process each
ONE_NODE = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=00:20:00"]   # x NPROC_PER_NODE


@lru_cache(maxsize=1)
def cluster_nodes() -> tuple[list[str], str | None]:
    """The cluster's node names, or why Slurm cannot be used here (asked once: without a controller
    sinfo takes seconds)."""
    try:
        proc = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N"], capture_output=True, text=True,
                              timeout=20)
    except FileNotFoundError:
        return [], f"Slurm is not installed ({START})"
    except subprocess.TimeoutExpired:
        return [], f"sinfo did not answer within 20 s: no Slurm configuration? ({START})"
    if proc.returncode != 0:
        return [], f"no Slurm controller answers ({proc.stderr.strip()}); {START}"
    return sorted(set(proc.stdout.split())), None


def require_cluster(nodes: int = 1) -> None:
    """Skip (fail under REQUIRE_SLURM=1) unless a cluster of at least `nodes` nodes answers."""
    names, reason = cluster_nodes()
    if reason is None and len(names) < nodes:
        reason = f"the cluster has {len(names)} node(s), this test needs {nodes} ({START})"
    if reason and os.environ.get("REQUIRE_SLURM") == "1":
        pytest.fail(f"REQUIRE_SLURM=1 but {reason}")
    if reason:
        pytest.skip(reason)


def user_env(**extra: str) -> dict:
    """A user's shell with this Python's environment activated; 1 process per node unless said."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "1", **extra}


def sbatch(script: str, output: Path, *args: str, options: list[str] = TWO_NODES, env: dict | None = None) -> str:
    """Submit slurm/<script> as a user would; the job id."""
    proc = subprocess.run(["sbatch", "--parsable", *options, f"--output={output}", str(REPO / "slurm" / script),
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
        info = job(job_id)
        ended = info.get("JobState") in ENDED and not condition()  # a job that ended will not make it
        if time.monotonic() > deadline or ended or (info.get("JobState") == "PENDING" and info.get("Reason") in NEVER):
            tail = output.read_text()[-4000:] if output.exists() else "(no output yet)"
            pytest.fail(f"job {job_id}: no {what} after {timeout:.0f} s (state {info.get('JobState')}, "
                        f"reason {info.get('Reason')}):\n{tail}")
        time.sleep(every)


def wait_for_end(job_id: str, output: Path, timeout: float = WAIT_S) -> dict:
    wait_until(lambda: job(job_id).get("JobState") in ENDED, "end", job_id, output, timeout=timeout, every=0.5)
    return job(job_id)


def completed(job_id: str, output: Path) -> None:
    info = wait_for_end(job_id, output)
    assert info["JobState"] == "COMPLETED", f"job {job_id} {info['JobState']}:\n{output.read_text()[-4000:]}"


def uts_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/uts")
    except OSError:
        return None


def job_processes_on(node: str, job_id: str) -> list[psutil.Process]:
    """Every process of the job on one node of the local cluster: those in the UTS namespace of the
    node's slurmd (tools/local_slurm.sh) that belong to the job: its slurmstepd and what it started."""
    namespace = uts_namespace(int(Path(f"/run/slurmd-{node}.pid").read_text()))
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if uts_namespace(proc.pid) != namespace:
                continue
            if f"[{job_id}." in " ".join(proc.info["cmdline"] or []) or proc.environ().get("SLURM_JOB_ID") == job_id:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def on_node(proc: psutil.Process) -> str | None:
    """The local cluster's node a job process runs on."""
    try:
        return proc.environ().get("SLURMD_NODENAME")
    except psutil.Error:
        return None
