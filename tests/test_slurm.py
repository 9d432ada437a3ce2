"""The slurm/ job scripts on a real two-node Slurm cluster (tools/local_slurm.sh with NODES=2 starts
one on this machine; CI does so in .ci/run), one process per node: `sbatch --nodes=2
slurm/finetune_vitg.sh model=tiny data=digits` under torchrun (ZeRO-3) and accelerate (FSDP2)
matches a plain run; a preemption signal stops the ranks of both nodes at one step, and the job
requeues itself and resumes to the same weights; a node lost mid-run fails the job within a
bounded time and the same sbatch line resumes; a hung rank times out after parallel.timeout.
Slow: checkpoints resumed on another number of nodes, pipeline.sh chained on two nodes.

Without a reachable two-node controller these tests skip, saying why; with REQUIRE_SLURM=1 (CI) they fail."""
import collections
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SGD, SMALL, run_pipeline, training_processes, updates_close, weights_close
from slurm_cluster import (
    ONE_NODE,
    completed,
    job,
    job_processes_on,
    on_node,
    require_cluster,
    sbatch,
    user_env,
    wait_for_end,
    wait_until,
)

from pipeline.parallel.checkpoint import damage

# recipe=none: the job scripts pass recipe=rsk, and the jobs are compared with plain runs (SGD: conftest.SGD).
TINY = ["model=tiny", "data=digits", "recipe=none", *SMALL, *SGD]


@pytest.fixture(scope="module", autouse=True)
def two_nodes():
    require_cluster(nodes=2)


def ranks_by_node(run: Path) -> dict[str, str]:
    """Each rank's host, from the line every rank logs first ('rank r of n on host')."""
    found = {}
    for log in sorted((run / "logs").glob("rank*.log")):
        for rank, host in re.findall(r"rank (\d+) of \d+ on (\S+)", log.read_text()):
            found[rank] = host
    return found


@pytest.fixture(scope="module")
def fsdp2_straight(tmp_path_factory) -> Path:
    """The same job launched by accelerate with FSDP2."""
    tmp = tmp_path_factory.mktemp("slurm_fsdp2")
    job_id = sbatch("finetune_vitg.sh", tmp / "job.out", f"run_dir={tmp / 'run'}", "parallel=fsdp2", *TINY,
                    env=user_env(LAUNCHER="accelerate"))
    completed(job_id, tmp / "job.out")
    return tmp


def test_accelerate_fsdp2_job_across_two_nodes_matches_a_plain_run(fsdp2_straight, sgd_run):
    assert "2 node(s) x 1 process(es), accelerate" in (fsdp2_straight / "job.out").read_text()
    assert ranks_by_node(fsdp2_straight / "run") == {"0": "node1", "1": "node2"}
    meta = json.loads((fsdp2_straight / "run" / "checkpoints" / "step_6" / "meta.json").read_text())
    assert (meta["format"], meta["parallel"], meta["world_size"]) == ("dcp", "fsdp2", 2)
    updates_close(fsdp2_straight / "run", sgd_run)


def paused_after_first_checkpoint(run: Path, job_id: str, output: Path) -> list:
    """The job's two ranks, stopped (SIGSTOP) as soon as its first checkpoint is published, so that
    whatever the test does next happens mid-training however fast the steps go."""
    wait_until(lambda: (run / "checkpoints" / "latest").exists(), "checkpoint", job_id, output)
    ranks = training_processes(run)
    for rank in ranks:
        rank.suspend()
    assert sorted(on_node(r) for r in ranks) == ["node1", "node2"], f"expected a rank on each node, found {ranks}"
    return ranks


@pytest.fixture(scope="module")
def preempted(tmp_path_factory) -> tuple[Path, str]:
    """One small finetune_vitg.sh job (ZeRO-3, one process on each of two nodes, 6 steps), preempted
    after its first checkpoint by SIGUSR1 to the batch shell, as `#SBATCH --signal=B:USR1@120` sends
    it before the time limit (the stop file reaches the rank on the other node through the shared run
    directory); requeued, it resumes and completes. Its folder and job id, for the tests below."""
    tmp = tmp_path_factory.mktemp("slurm_preempted")
    run, output = tmp / "run", tmp / "job.out"
    job_id = sbatch("finetune_vitg.sh", output, f"run_dir={run}", *TINY)
    ranks = paused_after_first_checkpoint(run, job_id, output)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=30)
    wait_until(lambda: (run / f"stop.{job_id}.0").exists(), "stop file", job_id, output, timeout=60)
    for rank in ranks:
        rank.resume()
    wait_for_end(job_id, output)
    return tmp, job_id


def test_zero3_job_across_two_nodes_matches_a_plain_run(preempted, sgd_run):
    tmp, _ = preempted
    log = (tmp / "job.out").read_text()
    assert "2 node(s) x 1 process(es), torchrun" in log and "launch: pipeline/run.py exited with status 0" in log
    assert ranks_by_node(tmp / "run") == {"0": "node1", "1": "node2"}
    meta = json.loads((tmp / "run" / "checkpoints" / "step_6" / "meta.json").read_text())
    assert (meta["format"], meta["parallel"], meta["world_size"]) == ("deepspeed", "zero3", 2)
    updates_close(tmp / "run", sgd_run)


def test_preempted_two_node_job_stops_both_nodes_at_one_step_and_resumes(preempted):
    tmp, job_id = preempted
    run, output = tmp / "run", tmp / "job.out"
    info = job(job_id)
    log = output.read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), log[-4000:]
    first, second = log.split(f"launch: job {job_id} (restart 1)")
    assert "preempted after step" in first and f"requeued Slurm job {job_id}" in first
    assert "requeued the job: exit status 75" in first, first[-3000:]  # not the requeue's 143, nor nothing
    ours = [line for line in first.splitlines() if re.match(r"(launch:|stopped:|\d\d:\d\d:\d\d )", line)]
    repeated = [line for line, n in collections.Counter(ours).items() if n > 1]  # torchrun's own lines aside
    assert not repeated, repeated
    assert "SLURM_RESTART_COUNT=1" in second and "resuming from" in second
    stopped = {log.name: re.findall(r"preempted after step (\d+)", log.read_text()) for log in (run / "logs").glob("rank*")}
    assert stopped["rank0.log"] == stopped["rank1.log"] and len(stopped["rank0.log"]) == 1, stopped


def test_lost_node_fails_the_job_and_the_same_line_resumes(sgd_run, tmp_path):
    """Every process of the job on node2 killed (its slurmstepd too, as when the node dies): Slurm
    alone would wait for that node's tasks forever; the job must end as failed within a bounded time."""
    run, output = tmp_path / "run", tmp_path / "job.out"
    line = ("finetune_vitg.sh", output, f"run_dir={run}", *TINY)
    job_id = sbatch(*line)
    ranks = paused_after_first_checkpoint(run, job_id, output)
    lost = job_processes_on("node2", job_id)
    assert any("slurmstepd" in " ".join(p.cmdline()) for p in lost) and any(p in ranks for p in lost), lost
    for proc in lost:
        proc.kill()
    lost_at = time.monotonic()
    for rank in ranks:
        if rank not in lost:
            rank.resume()

    info = wait_for_end(job_id, output, timeout=120)
    assert info["JobState"] == "FAILED", output.read_text()[-4000:]
    print(f"the job failed {time.monotonic() - lost_at:.0f} s after its node2 processes were killed")
    assert "a node failed; ending the job step" in output.read_text()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_3"
    assert not (run / "export" / "model.safetensors").exists() and not (run / "stages" / "finetune.json").exists()

    again = sbatch(*line)
    completed(again, output)
    assert "resuming from" in output.read_text().split(f"launch: job {again}")[1]
    updates_close(run, sgd_run)


@pytest.mark.slow  # 47 s: a two-node job waiting out parallel.timeout
def test_hung_rank_times_out_after_parallel_timeout(tmp_path):
    """The rank on node2 stopped (SIGSTOP): the other one's next collective gets no answer, fails
    after parallel.timeout with one line, and the job fails; nothing half-written looks complete."""
    run, output = tmp_path / "run", tmp_path / "job.out"
    job_id = sbatch("finetune_vitg.sh", output, f"run_dir={run}", *TINY, "train.max_steps=1000",
                    "parallel.timeout=20")
    ranks = paused_after_first_checkpoint(run, job_id, output)
    hung = next(r for r in ranks if on_node(r) == "node2")
    for rank in ranks:
        if rank is not hung:
            rank.resume()
    stopped_at = time.monotonic()
    try:
        info = wait_for_end(job_id, output, timeout=20 + 120)
    finally:
        if hung.is_running():
            hung.kill()
    log = output.read_text()
    assert info["JobState"] == "FAILED", log[-4000:]
    print(f"the job failed {time.monotonic() - stopped_at:.0f} s after its node2 rank was stopped")
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: a collective got no answer within 20 s (parallel.timeout)"), \
        log[-4000:]
    assert not (run / "stages" / "finetune.json").exists() and not (run / "export").exists()
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert damage(latest) is None, f"latest names {latest.name}, which is not complete: {damage(latest)}"


def stopped_after_first_checkpoint(finished: Path, run: Path) -> Path:
    """A copy of a finished run as a run stopped after its first kept checkpoint leaves it (step_3, or the
    preempted job's step_4): its shards, and that checkpoint named by `latest` (nothing of finetune or
    export marked complete)."""
    first = min((p for p in (finished / "checkpoints").glob("step_*[0-9]")), key=lambda p: int(p.name[5:])).name
    shutil.copytree(finished / "shards", run / "shards")
    shutil.copytree(finished / "stages", run / "stages", ignore=lambda d, names: [n for n in names if n != "shard.json"])
    shutil.copytree(finished / "checkpoints" / first, run / "checkpoints" / first)
    (run / "checkpoints" / "latest").write_text(first)
    return run


def resumed(tmp_path: Path, finished: Path, options: list[str], *args: str, words: tuple[str, ...],
            env: dict | None = None) -> str:
    """The rest of `finished`'s run (from step 3) as a job with other nodes, with `words` as it ran; its output."""
    run, output = stopped_after_first_checkpoint(finished, tmp_path / "run"), tmp_path / "job.out"
    completed(sbatch("finetune_vitg.sh", output, f"run_dir={run}", *words, *args, options=options, env=env), output)
    return output.read_text()


# DeepSpeed's universal checkpoint conversion (deepspeed/checkpoint/ds_to_universal.py, lines 154-155 and
# 196-197 in 0.19.8) reads Adam's exp_avg and exp_avg_sq: a ZeRO checkpoint of an SGD run cannot be
# resharded. So the ZeRO-3 jobs here train with AdamW and are compared with the one-process AdamW run
# (conftest.digits_run, conftest.weights_close), as tests/test_resharding.py's pipeline-level test does;
# the FSDP2 jobs keep SGD and updates_close.
WORDS = {"zero3": ("model=tiny", "data=digits", "recipe=none", *SMALL), "fsdp2": tuple(TINY)}


def matches_one_process(backend: str, run: Path, request) -> None:
    if backend == "zero3":
        weights_close(run, request.getfixturevalue("digits_run"))
    else:
        updates_close(run, request.getfixturevalue("sgd_run"))


@pytest.fixture(scope="module")
def zero3_adamw_two_nodes(tmp_path_factory) -> Path:
    """A finetune_vitg.sh job (ZeRO-3, one process on each of two nodes, 6 steps) with AdamW."""
    tmp = tmp_path_factory.mktemp("slurm_zero3_adamw")
    completed(sbatch("finetune_vitg.sh", tmp / "job.out", f"run_dir={tmp / 'run'}", *WORDS["zero3"]), tmp / "job.out")
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("backend, written", [("zero3", "zero3_adamw_two_nodes"), ("fsdp2", "fsdp2_straight")])
def test_two_node_checkpoint_resumed_on_one_node(backend, written, request, tmp_path):
    """Written by 2 processes on 2 nodes, resumed by 1 process on 1 node: DeepSpeed's universal
    checkpoint for ZeRO-3, DCP's resharding for FSDP2."""
    log = resumed(tmp_path, request.getfixturevalue(written) / "run", ONE_NODE, f"parallel={backend}", words=WORDS[backend])
    assert "1 node(s) x 1 process(es)" in log and "resuming from" in log
    assert ("DeepSpeed universal checkpoint" in log) == (backend == "zero3")
    matches_one_process(backend, tmp_path / "run", request)


@pytest.fixture(scope="module")
def one_process_zero3(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("zero3_one_process")
    run_pipeline("stage=finetune", f"run_dir={run}", "parallel=zero3", *SMALL)  # AdamW: see WORDS
    return run


@pytest.mark.slow
@pytest.mark.parametrize("backend, per_node, written", [("zero3", 2, "one_process_zero3"), ("fsdp2", 1, "sgd_run")])
def test_one_process_checkpoint_resumed_on_two_nodes(backend, per_node, written, request, tmp_path):
    """Written by 1 process (ZeRO-3, or parallel=none's DCP), resumed on 2 nodes: ZeRO-3 by 2 processes
    on each (4 in all), FSDP2 by 1 on each."""
    log = resumed(tmp_path, request.getfixturevalue(written), ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2"],
                  f"parallel={backend}", env=user_env(NPROC_PER_NODE=str(per_node)), words=WORDS[backend])
    assert f"2 node(s) x {per_node} process(es)" in log and "resuming from" in log
    assert ("DeepSpeed universal checkpoint" in log) == (backend == "zero3")
    matches_one_process(backend, tmp_path / "run", request)


@pytest.mark.slow
def test_pipeline_sh_chains_the_stages_on_two_nodes(digits_run, tmp_path):
    """embed -> finetune (ZeRO-2) -> eval, each job on two nodes; two shards per split, so that the
    ranks of both nodes embed some (eval: every rank embeds its shards, rank 0 writes the results)."""
    run = tmp_path / "run"
    proc = subprocess.run(["bash", "slurm/pipeline.sh", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2",
                           f"--output={tmp_path}/%x-%j.out", f"run_dir={run}", *TINY, "data.shard_max_count=500"],
                          cwd=REPO, env=user_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ids = dict(line.split() for line in proc.stdout.splitlines())
    assert set(ids) == {"embed", "finetune", "eval"}
    assert job(ids["eval"])["Dependency"].startswith(f"afterok:{ids['finetune']}")
    info = wait_for_end(ids["eval"], tmp_path / f"eval-{ids['eval']}.out")
    assert info["JobState"] == "COMPLETED", "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("*.out"))
    assert all(job(ids[s])["JobState"] == "COMPLETED" for s in ("embed", "finetune"))
    assert all(job(i)["NodeList"] == "node[1-2]" for i in ids.values())
    assert set(json.loads((run / "eval" / "metrics.json").read_text())) == {"frozen", "finetuned"}
    assert "[eval] done" in (run / "logs" / "rank1.log").read_text() and ranks_by_node(run)["1"] == "node2"
    # The frozen encoder's embeddings, made by the ranks of two nodes, are one process's.
    for split in ("train", "test"):
        two = np.load(run / "embeddings" / "frozen" / f"{split}.npz")
        one = np.load(digits_run / "embeddings" / "frozen" / f"{split}.npz")
        assert list(two["keys"]) == list(one["keys"])
        np.testing.assert_allclose(two["embeddings"], one["embeddings"], atol=1e-5)
