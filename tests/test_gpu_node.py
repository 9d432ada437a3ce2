"""What a GPU node's run needs and this CPU machine can still check: device=cuda without a usable GPU stops
in one line naming torch's CUDA and the driver's, and work done on rank 0 alone gets the node's cores."""
import os
import stat
import subprocess

import pytest
import torch
from conftest import REPO, run_pipeline

from pipeline.parallel import distributed

SMI_HEADER = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
"""


def fake_nvidia_smi(folder, monkeypatch) -> None:
    """An nvidia-smi on PATH that answers as an R550 driver does (too old for a CUDA 13 torch)."""
    folder.mkdir()
    smi = folder / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\ncat <<'EOF'\n{SMI_HEADER}EOF\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a usable GPU")
def test_device_cuda_without_a_gpu_stops_in_one_line_naming_both_versions(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path / "bin", monkeypatch)
    proc = run_pipeline("stage=embed", f"run_dir={tmp_path / 'run'}", "device=cuda", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: device=cuda but no GPU is visible: torch {torch.__version__} is built for CUDA {torch.version.cuda}; "
        "nvidia-smi: driver 550.54.15, which runs CUDA up to 12.4; use device=cpu or device=auto"]
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a usable GPU")
def test_device_cuda_without_a_driver_says_nvidia_smi_does_not_answer(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi there
    with pytest.raises(distributed.UserError, match="nvidia-smi does not answer"):
        distributed.pick_device("cuda", distributed.World())


def test_a_slurm_job_given_gpus_passes_device_cuda_and_one_without_does_not(tmp_path):
    """slurm/launch.sh under a stand-in srun and scontrol (no cluster needed): device=cuda comes first, so a
    device= the user gives still wins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"srun": 'echo "$@" > "$SRUN_ARGS"', "scontrol": "echo node1"}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)

    def launched(gpus: str) -> list[str]:
        env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_NNODES": "1",
               "SLURM_JOB_NODELIST": "node1", "SLURM_GPUS_ON_NODE": gpus, "SRUN_ARGS": str(tmp_path / "args")}
        proc = subprocess.run(["bash", "-c", 'source slurm/launch.sh; launch stage=embed "run_dir=$1"', "job",
                               str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        words = (tmp_path / "args").read_text().split()
        return words[words.index("pipeline/run.py") + 1:]

    assert launched("8") == ["device=cuda", "stage=embed", f"run_dir={tmp_path / 'run'}"]
    assert launched("0") == ["stage=embed", f"run_dir={tmp_path / 'run'}"]


def test_rank_zero_works_alone_with_the_nodes_cores_on_a_gpu_node(monkeypatch):
    """Under torchrun (OMP_NUM_THREADS=1 per rank) on a GPU node given 3 cores, on_main's work and faiss
    inside it run on 3 threads, and the rank's own count comes back after; a CPU run keeps its share."""
    import faiss
    import numpy as np

    from pipeline.eval import metrics

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    faiss_threads = []
    monkeypatch.setattr(faiss, "omp_set_num_threads", faiss_threads.append)
    before = torch.get_num_threads()
    try:
        distributed.set_threads(torch.device("cuda", 0))  # touches no GPU
        torch.set_num_threads(1)
        inside = distributed.on_main(lambda: (torch.get_num_threads(), metrics.retrieval_metrics(
            np.eye(4, dtype=np.float32), [0, 0, 1, 1], ks=(1,), nmi=False)["num_queries"]))
        assert inside == (3, 4) and faiss_threads == [3] and torch.get_num_threads() == 1
        distributed.set_threads(torch.device("cpu"))
        assert distributed.on_main(torch.get_num_threads) == torch.get_num_threads()
    finally:
        distributed.set_threads(torch.device("cpu"))
        torch.set_num_threads(before)
