"""Logging to the console and to run_dir/logs/<stage>.log (rank 0 only prints)."""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ToLogFile(logging.Filter):
    """A library's chatter that a user cannot act on: into this process's log file at debug level, not
    onto the console (libraries print through handlers of their own). Records whose "source file:
    message" matches `pattern`; the library's other lines, and anything at ERROR, still print."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or not self.pattern.search(f"{record.pathname}: {record.getMessage()}"):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        return False


# Set before the libraries are imported (they add their handlers then, and keep the filters):
# DeepSpeed's accelerator lines ("Setting accelerator to CPU..."), and torch's note, when DeepSpeed
# imports its extension builder on a machine without CUDA, that it found no CUDA runtime.
CHATTY = {"DeepSpeed": ToLogFile(r"deepspeed[/\\]accelerator[/\\]"),
          "torch.utils.cpp_extension": ToLogFile(r": No CUDA runtime is found")}


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
    for name, chatter in CHATTY.items():
        logging.getLogger(name).addFilter(chatter)
