"""A write that fails for a reason the user can fix (a full disk, a quota, a read-only or
permission-denied run directory) ends the command in one line instead of a library's traceback.

`writing(what, path)` wraps a write: such a failure removes the partial output it names (a `.tmp`),
logs the full traceback to the run's log files (not the console), and raises WriteFailed, a
UserError, saying what was being written, the errno in words, the space free (and needed, where
known) and what to do. The failures are recognised however the library wraps them: an OSError
anywhere in the exception's chain, DCP's CheckpointException (a BaseException holding each rank's
error), and torch.save's RuntimeError from its zip writer, which carries no errno (read as "no space
left" when the disk has under FULL bytes free).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import shutil
from pathlib import Path
from typing import Callable, Iterator

from pipeline.errors import UserError

log = logging.getLogger(__name__)
FIXABLE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted", errno.EFBIG: "file too large"}
# torch.save's zip writer (PyTorchStreamWriter) reports a short write without its errno.
_TORCH_WRITE = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
FULL = 64 << 20


class WriteFailed(UserError):
    """A write failed for a reason the user can fix; the message is the one line to print."""


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += [pair[0] if isinstance(pair, tuple) else pair for pair in failures.values()]


def fixable(exc: BaseException, path: Path) -> tuple[int, str | None] | None:
    """(errno, the file named) if `exc` is a write failure the user can fix, else None."""
    for e in _causes(exc):
        if isinstance(e, OSError) and e.errno in FIXABLE:
            return e.errno, e.filename
    for e in _causes(exc):
        if isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_WRITE) and free_bytes(path) < FULL:
            return errno.ENOSPC, None
    return None


def nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(nearest_existing(path)).free
    except OSError:
        return -1


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.1f} MB"


def remove(path: Path | None) -> None:
    if path is None:
        return
    if Path(path).is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            Path(path).unlink()


def log_traceback(exc: BaseException, what: str) -> None:
    """The full traceback, to the log files only (pipeline/log.py keeps file_only records off the
    console); a log file on the full disk itself loses it silently instead of printing logging's own error."""
    raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        log.error("writing %s failed", what, exc_info=(type(exc), exc, exc.__traceback__), extra={"file_only": True})
    finally:
        logging.raiseExceptions = raise_exceptions


def message(what: str, path: Path, code: int, filename: str | None, need: int | None, then: str) -> str:
    where = f" ({filename})" if filename else f" in {path}"
    space = ""
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        free = free_bytes(path)
        space = f"; {gb(free)} free on {nearest_existing(path)}" if free >= 0 else ""
        space += f", about {gb(need)} needed" if need else ""
        todo = "free some space or put run_dir on a larger disk"
    else:
        todo = f"make {nearest_existing(path)} writable or choose another run_dir"
    return f"writing {what}{where} failed: {FIXABLE[code]}{space}; {todo}, then {then}"


@contextlib.contextmanager
def writing(what: str, path: Path, partial: Path | Callable[[], list[Path]] | None = None, need: int | None = None,
            then: str | Callable[[], str] = "run the same command again") -> Iterator[None]:
    """Turn a fixable write failure inside the block into WriteFailed; `partial` (a .tmp file or
    folder, or a function listing them) is removed first. `then`, what to do once space is freed, may be
    a function, asked after the removal (e.g. which checkpoint a rerun resumes from)."""
    try:
        yield
    except WriteFailed:
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException; others re-raised
        found = fixable(e, path)
        if found is None:
            raise
        for p in partial() if callable(partial) else [partial]:
            remove(p)
        log_traceback(e, what)
        raise WriteFailed(message(what, path, *found, need, then() if callable(then) else then)) from None

