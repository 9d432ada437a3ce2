"""Logging to the console and to run_dir/logs/<stage>.log (rank 0 only prints)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(log_dir: Path, rank: int = 0) -> None:
    logging.raiseExceptions = False  # a log file on a full disk loses lines; the write that matters says so (pipeline/disk.py)
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    if rank == 0:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        console.addFilter(lambda record: not getattr(record, "file_only", False))  # tracebacks of one-line errors
        root.addHandler(console)
    log_dir.mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(log_dir / f"rank{rank}.log")
    file.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(file)
    for noisy in ("PIL", "matplotlib", "urllib3", "timm", "torch.distributed.checkpoint", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
