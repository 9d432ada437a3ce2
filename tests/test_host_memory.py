"""CPU tensors that are freed go back to the system once a CPU process has joined (host_memory.py):
measured as resident memory in a fresh process, against the same process without the setting."""
import subprocess
import sys

import pytest
from conftest import REPO

# 100 tensors of 4 MiB, each followed by a small one that stays alive, then the large ones freed:
# the ZeRO-3 pattern (gathered weights freed between live activations) in miniature. Prints the
# MiB resident above the start at the peak and after the frees.
SCRIPT = """
import sys
import psutil, torch
sys.path.insert(0, {repo!r})
from pipeline.dist import distributed
if sys.argv[1] == "pipeline":
    distributed.init(distributed.World(), torch.device("cpu"))
process = psutil.Process()
first = torch.ones(4 << 20, dtype=torch.uint8)
del first  # glibc's own rule raises its mmap threshold at this free
start = process.memory_info().rss
large, small = [], []
for _ in range(100):
    large.append(torch.ones(4 << 20, dtype=torch.uint8))
    small.append(torch.ones(16 << 10, dtype=torch.uint8))
peak = process.memory_info().rss
large.clear()
print((peak - start) / 2**20, (process.memory_info().rss - start) / 2**20)
"""


def resident_mib(arm: str) -> tuple[float, float]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(repo=str(REPO)), arm], capture_output=True,
                          text=True, timeout=120, check=True)
    peak, after = map(float, proc.stdout.split())
    return peak, after


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_tensors_return_to_the_system_in_a_cpu_process():
    peak, kept = resident_mib("default")
    assert peak > 350 and kept > 350, "without the setting glibc keeps the freed 400 MiB (the reason for it)"
    peak, kept = resident_mib("pipeline")
    assert peak > 350 and kept < 50, (peak, kept)
