"""The plan's tracked peak against what the process really grows by: one real step of the plan's own
code (simulate(fake=False), one process, gloo), its tracker's peak beside the growth of the process's
peak resident memory (VmHWM after the step minus the resident memory before the model is built).
The RSS also holds what no tracker sees (the allocator's free blocks, oneDNN's scratch, torch's lazy
initialisation), which is what the plan's allowances stand for on a GPU.

    bash tools/env.sh python tools/plan_vs_rss.py model=vitl14_clip model.depth=4 model.width=256 ...

Prints one JSON line. Run each configuration in a fresh process (the peak is a high-water mark).
"""
import json
import sys

import psutil
import torch.distributed as dist

from pipeline.config import load_config
from pipeline.models import accounting
from pipeline.plan.simulate import simulate

MIB = 2 ** 20


def main(overrides: list[str]) -> dict:
    cfg = load_config(overrides)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    before = psutil.Process().memory_info().rss
    m = simulate(cfg, cfg.train.chunk_size, fake=False)
    peak = accounting.high_water_kib() * 1024
    dist.destroy_process_group()
    return {"overrides": overrides, "tracked_peak_mib": m.peak / MIB, "rss_growth_mib": (peak - before) / MIB,
            "ratio_rss_over_tracked": (peak - before) / m.peak}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
