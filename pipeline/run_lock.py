"""One writer per run directory: `run_dir/.lock`, held with flock for as long as the command runs.

The kernel releases a flock when its holder dies however it dies (SIGKILL, a node reboot, a
requeued Slurm job's old process), so there is never a stale lock to delete by hand. Who holds it
(host, pid, Slurm job, start time, command) is written into the lock file itself once it is held,
so a second writer's error can name the first. Under several processes rank 0 alone holds it
(pipeline/runner.py).

A filesystem whose flock fails (some NFS mounts: ENOLCK, EOPNOTSUPP) is reported in one line;
`lock=false` runs without the check.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from pipeline.errors import UserError

NAME = ".lock"
READ_ONLY_STAGES = ("plan",)  # stages that only read the run directory (pipeline/runner.py's stage=plan)
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def needs_lock(stage: str) -> bool:
    """Whether a command running `stage` writes its run directory (and so must be its only writer)."""
    return stage not in READ_ONLY_STAGES


class RunLock:
    """The held lock; release() (or the process's death) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1


def holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": _slurm_job(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": shlex.join(sys.argv)}


def _slurm_job() -> str | None:
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def acquire(root: Path) -> RunLock:
    """Take run_dir/.lock without waiting (the folder is made if missing); a UserError naming the
    holder if another process has it, or saying that this filesystem cannot lock."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _flock_retrying(fd, root)
    except OSError as e:
        os.close(fd)
        if e.errno in _UNSUPPORTED:
            raise UserError(f"{root} is on a filesystem where file locks do not work ({os.strerror(e.errno)}), so "
                            f"a second command on it could not be stopped; put run_dir on a local or lock-capable "
                            f"disk, or set lock=false to run without the check") from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(holder_info()) + "\n").encode())
    return RunLock(path, fd)


def _flock_retrying(fd: int, root: Path) -> None:
    """flock, tried again when the lock was busy only because a holder() probe held it shared for an instant."""
    for _ in range(3):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            if holder(root) is not None:
                os.close(fd)
                raise UserError(in_use_message(root)) from None
            time.sleep(0.05)
    os.close(fd)
    raise UserError(in_use_message(root))


def holder(root: Path) -> dict | None:
    """Who holds run_dir/.lock now, or None if nobody does (the file alone proves nothing: a dead
    holder's file stays, its flock does not)."""
    path = Path(root) / NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None  # cannot tell: the writer itself will say so
            return _read_info(path)
        return None  # we could lock it: nobody else holds it
    finally:
        os.close(fd)  # drops our shared lock, if taken


def _read_info(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # the holder has not written its details yet
        return {}


def describe(info: dict) -> str:
    """'pid 4242 on node-3 (Slurm job 17, since 12:03:11)'."""
    if not info:
        return "another process (starting)"
    since = str(info.get("since", ""))
    details = ([f"Slurm job {info['slurm_job']}"] if info.get("slurm_job") else []) + \
              ([f"since {since[11:] if since[:10] == time.strftime('%Y-%m-%d') else since.replace('T', ' ')}"]
               if since else [])
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}" + (f" ({', '.join(details)})" if details else "")


def in_use_message(root: Path) -> str:
    info = holder(root) or {}
    command = f": {info['command']}" if info.get("command") else ""
    return (f"{root} is in use by {describe(info)}{command}; wait for it to end (or stop it), "
            f"or give this command another run_dir")
