"""Where faiss runs: this process's GPU only once a tiny build and search on it has worked, else the CPU.

A faiss GPU build without code for the device (PyPI's faiss-gpu-cu12 has none for Hopper or Blackwell)
fails at its first kernel launch, and faiss then calls abort(): no Python `except` catches that, and
the rank dies after every embedding has been computed. So the first use on a device runs the same
calls in a child process (PROBE): a flat inner-product index on the GPU, its search compared with the
CPU's. The verdict is cached per device, faiss version and driver in `faiss_gpu.json` under
$PIPELINE_CACHE_DIR (default: $XDG_CACHE_HOME/pipeline, else ~/.cache/pipeline); delete the file to
probe again. Where the probe fails, faiss runs on the CPU and one log line says why.

faiss's CPU threads follow torch's (`cpu_threads`): faiss's OpenMP is its own, and under torchrun or
accelerate it would keep their OMP_NUM_THREADS=1 even where rank 0 has the node's cores
(pipeline/parallel/distributed.py's on_main).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import faiss
import torch

from pipeline.parallel.distributed import nvidia_driver

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 300  # a first CUDA context and faiss's kernels load in seconds; a hung driver does not end
PROBE = """
import resource
import sys
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an abort leaves no core file behind
import numpy as np
import faiss
device = int(sys.argv[1])
x = np.random.default_rng(0).standard_normal((256, 16)).astype("float32")
cpu = faiss.IndexFlatIP(16)
cpu.add(x)
gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device, faiss.IndexFlatIP(16))
gpu.add(x)
_, want = cpu.search(x, 4)
_, got = gpu.search(x, 4)
print("same" if (want == got).mean() > 0.99 else "different")
"""
_verdicts: dict[str, str | None] = {}  # key -> None (the GPU works) or why not, for this process


def gpu_device() -> int | None:
    """The GPU faiss may search and cluster on in this process (torch's current device, the rank's own),
    or None: the CPU (a CPU build, no GPU, or a probe that failed: logged once)."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return None
    device = torch.cuda.current_device() if torch.cuda.is_available() else 0
    key = device_key(device)
    if key not in _verdicts:
        cached = _read_cache()
        if key in cached:
            _verdicts[key] = cached[key]
        else:
            _verdicts[key] = probe(device)
            _write_cache({**_read_cache(), key: _verdicts[key]})
        if _verdicts[key] is not None:
            log.warning("faiss runs on the CPU: a tiny search on GPU %d (%s) %s; docs/precision.md names a faiss "
                        "build for this GPU", device, key, _verdicts[key])
    return device if _verdicts[key] is None else None


def device_key(device: int) -> str:
    """What the verdict depends on: the GPU (name and compute capability), faiss's version and the driver's."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        gpu = f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    else:
        gpu = f"GPU {device}"
    return f"{gpu}, faiss {faiss.__version__}, driver {_driver()}"


@functools.cache
def _driver() -> str:
    """Asked of nvidia-smi once per process: every search and k-means asks for the device."""
    return nvidia_driver()[0] or "unknown"


def probe(device: int) -> str | None:
    """None if the child's GPU search ran and agreed with the CPU's; else what went wrong, in a few words."""
    try:
        child = subprocess.run([sys.executable, "-c", PROBE, str(device)], capture_output=True, text=True,
                               timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"did not finish within {PROBE_TIMEOUT_S} s in a child process"
    last = (child.stderr.strip().splitlines() or [""])[-1]
    if child.returncode < 0:
        return f"killed its child process ({signal.Signals(-child.returncode).name}){': ' + last if last else ''}"
    if child.returncode != 0:
        return f"failed in a child process: {last}"
    if child.stdout.strip() != "same":
        return "returned other neighbours than the CPU's"
    return None


def cpu_threads() -> None:
    """faiss's OpenMP threads: as many as torch has in this process."""
    faiss.omp_set_num_threads(torch.get_num_threads())


def cache_file() -> Path:
    if os.environ.get("PIPELINE_CACHE_DIR"):
        return Path(os.environ["PIPELINE_CACHE_DIR"]) / "faiss_gpu.json"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pipeline" / "faiss_gpu.json"


def _read_cache() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(verdicts: dict) -> None:
    """Best effort (a read-only home only means probing again next time); replaced whole, never half-written."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(verdicts, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        log.debug("faiss GPU verdict not cached in %s: %s", path, e)
