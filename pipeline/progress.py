"""The training-step progress bar: rank 0, on a terminal only (tqdm, with ETA, loss and img/s).

Where stderr is not a terminal (a Slurm output file, a pipe, CI) there is no bar at all, only the
plain log lines every train.log_every steps. With the bar shown, log lines print above it.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator, TextIO

from tqdm import tqdm


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
