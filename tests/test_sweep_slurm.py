"""slurm/sweep.sh on the local Slurm cluster: the job that shards once per group of runs with the same
data, then a 2 x 1 grid as one job array (two tasks at a time on the node's two CPUs), then the summary
job, which waits for the whole array (afterany). A second call submits no array, only the summary.
Skips without a cluster, fails with REQUIRE_SLURM=1 (slurm_cluster)."""
import json
import subprocess

import pytest
from conftest import REPO, SMALL
from slurm_cluster import job, require_cluster, user_env, wait_for_end
from test_sweep import assert_summary

ONE_CPU = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:20:00"]
FIXED = ["data=digits", "seed=0", *(a for a in SMALL if not a.startswith("train.global_batch="))]


@pytest.fixture(scope="module", autouse=True)
def one_node():
    require_cluster(nodes=1)


def submit(out, *grid: str) -> dict[str, str]:
    proc = subprocess.run(["bash", "slurm/sweep.sh", "--out", str(out), "--throttle", "2", *ONE_CPU, *grid, "--",
                           *FIXED], cwd=REPO, env=user_env(NPROC_PER_NODE="1"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines())


def test_sweep_sh_runs_a_job_array_then_the_summary(tmp_path):
    out = tmp_path / "sweep"
    grid = ["train.global_batch=16,32"]  # with seed=0 after --: two settings, one group of shards
    ids = submit(out, *grid)
    shards, array, summary = ids["shards"], ids["array"], ids["summary"]
    assert job(f"{array}_0")["Dependency"].startswith(f"afterany:{shards}")
    assert job(summary)["Dependency"].startswith(f"afterany:{array}")
    assert job(f"{array}_0")["ArrayTaskThrottle"] == "2"
    info = wait_for_end(summary, out / "slurm" / f"summary-{summary}.out")
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((out / "slurm").glob("*.out")))
    assert info["JobState"] == "COMPLETED", logs
    for task in range(2):
        assert job(f"{array}_{task}")["JobState"] == "COMPLETED", logs
        assert "launch: pipeline/run.py exited with status 0" in (out / "slurm" / f"{array}_{task}.out").read_text()
    names = ["train.global_batch=16", "train.global_batch=32"]
    assert_summary(out, {name: [name] for name in names})
    # the two runs shard the same data, once (the batch-16 run), and the batch-32 run got a copy of those
    # shards and their marker before its task started
    assert (out / "slurm" / f"shards-{shards}.out").read_text().count("sweep: sharding once in") == 1
    donor, copy = out / names[0], out / names[1]
    assert (copy / "stages" / "shard.json").read_bytes() == (donor / "stages" / "shard.json").read_bytes()
    assert "stages.shard" not in (copy / "logs" / "rank0.log").read_text()
    assert "2/2 runs finished" in (out / "slurm" / f"summary-{summary}.out").read_text()
    assert (out / "batch.png").is_file() and (out / "summary.png").is_file()

    again = submit(out, *grid)  # every run finished: no array, only a new summary
    assert again["array"].startswith("none") and set(again) == {"array", "summary"}  # and no shards job
    assert wait_for_end(again["summary"], out / "slurm" / f"summary-{again['summary']}.out")["JobState"] == "COMPLETED"
    assert json.loads((out / "summary.json").read_text())["train.global_batch=32"]["recall@1"]["n"] == 1
