"""plan: before any GPU is paid for, what the run needs on plan.nodes x plan.gpus_per_node plan.gpu:
per-GPU memory, whether it fits, the largest chunk, FLOPs, traffic, step and epoch time
(pipeline/plan/, docs/plan.md). Runs alone, on fake tensors; writes run_dir/plan/ only."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.plan import estimate, report


def run(cfg: Config) -> int:
    """0 if the run fits, 1 if not (its one line says by how much)."""
    p = estimate.plan(cfg, log=lambda line: print(line, flush=True))
    report.write(p, Path(cfg.run_dir) / "plan")
    print(report.markdown(p), end="")
    print(report.verdict(p))
    return 0 if p["fits"] else 1
