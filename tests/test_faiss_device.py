"""faiss on a GPU only after a tiny search there worked in a child process: a stand-in faiss whose GPU
search aborts the process (as PyPI's faiss-gpu-cu12 does on an H100) sends the eval to the CPU, which
finishes; the verdict is cached per GPU, faiss version and driver."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
from conftest import REPO, SMALL, run_pipeline
from test_evaluate import assert_same, copy_run

from pipeline.eval import faiss_device, metrics

STAND_IN = REPO / "tests" / "stand_in_faiss"
SEARCH_ON_THE_GPU = """
import faiss, numpy as np
index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss.IndexFlatIP(4))
index.add(np.eye(4, dtype="float32"))
index.search(np.eye(4, dtype="float32"), 1)
"""


def test_an_aborting_gpu_search_sends_the_eval_to_the_cpu_and_it_finishes(digits_run, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(STAND_IN), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    unprobed = subprocess.run([sys.executable, "-c", SEARCH_ON_THE_GPU], capture_output=True, text=True)
    assert unprobed.returncode == -signal.SIGABRT  # what the eval did before: no `except` catches it
    run = copy_run(digits_run, tmp_path / "run")
    run_pipeline("stage=eval", "force=true", f"run_dir={run}", *SMALL, "eval.models=[frozen]", "eval.diagnostics=false",
                 "eval.show_queries=0")
    frozen = {"frozen": json.loads((digits_run / "eval" / "metrics.json").read_text())["frozen"]}
    assert_same(json.loads((run / "eval" / "metrics.json").read_text()), frozen)  # the CPU's search
    why = [line for line in (run / "logs" / "rank0.log").read_text().splitlines() if "faiss runs on the CPU" in line]
    assert len(why) == 1 and "killed its child process (SIGABRT): Faiss assertion" in why[0], why
    (key, verdict), = json.loads((tmp_path / "cache" / "faiss_gpu.json").read_text()).items()
    assert f"GPU 0 ({key}) {verdict}; docs/precision.md" in why[0] and verdict.startswith("killed")


def test_the_verdict_is_probed_once_per_gpu_faiss_version_and_driver(tmp_path, monkeypatch):
    """A working GPU (the probe stands in) is used; the verdict comes from the cache file in the next
    process; a new faiss version probes again."""
    probed = []

    def probe(device):
        probed.append(device)
        return None  # the tiny search worked

    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(faiss_device, "probe", probe)
    monkeypatch.setattr(faiss_device, "_verdicts", {})
    monkeypatch.setattr(faiss_device.faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss_device.faiss, "StandardGpuResources", object, raising=False)
    assert faiss_device.gpu_device() == 0 and faiss_device.gpu_device() == 0 and probed == [0]
    monkeypatch.setattr(faiss_device, "_verdicts", {})  # a new process: the file answers
    assert faiss_device.gpu_device() == 0 and probed == [0]
    installed = faiss_device.faiss.__version__
    monkeypatch.setattr(faiss_device.faiss, "__version__", "9.9.9")
    assert faiss_device.gpu_device() == 0 and probed == [0, 0]
    keys = json.loads((tmp_path / "faiss_gpu.json").read_text())
    assert sorted(key.split(", ")[1] for key in keys) == sorted([f"faiss {installed}", "faiss 9.9.9"])


def test_faiss_threads_follow_torchs(monkeypatch):
    """faiss's OpenMP is its own: under torchrun's OMP_NUM_THREADS=1 it would stay at one thread."""
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    seen = []
    monkeypatch.setattr(metrics.faiss, "omp_set_num_threads", seen.append)
    metrics.retrieval_metrics(np.eye(4, dtype=np.float32), [0, 0, 1, 1], ks=(1,), nmi=False)
    assert seen == [3]
