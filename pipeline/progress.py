"""Progress bars on a terminal only: the training-step bar (tqdm, with ETA, loss and img/s) and
`progress()` for the other loops (sharding, embedding, validation).

Where stderr is not a terminal (a Slurm output file, a pipe, CI) there is no bar at all: training
logs its plain lines every train.log_every steps, and `progress()` logs one line at most every
EVERY seconds (count, rate, ETA), so a log file never holds a carriage return. With the training
bar shown, log lines print above it.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
EVERY = 30.0  # seconds between two progress lines in a file
log = logging.getLogger(__name__)


def on_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class StepProgress:
    def __init__(self, start: int, total: int, rank: int, stream: TextIO | None = None):
        stream = stream or sys.stderr
        self.bar = None
        if rank == 0 and on_terminal(stream):
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=stream, dynamic_ncols=True,
                            smoothing=0.1)

    @property
    def shown(self) -> bool:
        return self.bar is not None

    def note(self, loss: float, images_per_s: float) -> None:
        """The loss and img/s shown: the last logged ones."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}", refresh=False)

    def update(self) -> None:
        """One step done."""
        if self.bar is not None:
            self.bar.update(1)

    @contextlib.contextmanager
    def above(self) -> Iterator[None]:
        """Log lines printed inside this context go above the bar instead of through it."""
        if self.bar is None:
            yield
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[logging.getLogger()], tqdm_class=tqdm):
            yield

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress(items: Iterable[T], desc: str, total: int | None = None, rank: int = 0, unit: str = "it",
             every: float = EVERY, stream: TextIO | None = None) -> Iterator[T]:
    """`items`, with a tqdm bar on a terminal (rank 0) or, elsewhere, a log line at most every `every`
    seconds: 'shard train: 4000/9000 it, 812 it/s, ETA 6 s'. Other ranks show nothing."""
    stream = stream or sys.stderr
    if rank != 0:
        yield from items
        return
    if on_terminal(stream):
        yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False, mininterval=2, file=stream)
        return
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every:
            last = now
            log.info("%s", progress_line(desc, done, total, done / (now - start), unit))


def progress_line(desc: str, done: int, total: int | None, rate: float, unit: str) -> str:
    count = f"{done}/{total}" if total else f"{done}"
    eta = f", ETA {_duration((total - done) / rate)}" if total and rate > 0 else ""
    return f"{desc}: {count} {unit}, {rate:.3g} {unit}/s{eta}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
