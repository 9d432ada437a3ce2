"""Logging to the console and to run_dir/logs/<stage>.log (rank 0 only prints)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ToLogFile(logging.Filter):
    """A library's chatter that a user cannot act on (DeepSpeed's accelerator lines, "Setting accelerator
    to CPU...", printed through its own stdout handler): into this process's log file at debug level,
    not onto the console. Its other lines, and anything at ERROR, still print."""

    def __init__(self, *paths: str):
        super().__init__()
        self.paths = paths  # parts of the source file paths whose records are diverted

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or not any(p in record.pathname for p in self.paths):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        return False


# Set before the library is imported: it adds its handler then, and keeps the filter.
CHATTY = {"DeepSpeed": ToLogFile(os.path.join("deepspeed", "accelerator", ""))}


def setup(log_dir: Path, rank: int = 0) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    if rank == 0:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        root.addHandler(console)
    log_dir.mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(log_dir / f"rank{rank}.log")
    file.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(file)
    for noisy in ("PIL", "matplotlib", "urllib3", "timm", "torch.distributed.checkpoint", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name, chatter in CHATTY.items():
        logging.getLogger(name).addFilter(chatter)
