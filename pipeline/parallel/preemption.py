"""Preemption: stop after the current step, checkpoint, and requeue the Slurm job.

A stop is asked for by SIGUSR1 or SIGTERM reaching a training process, or by the file named in
$PIPELINE_STOP_FILE appearing. The Slurm scripts (`#SBATCH --signal=B:USR1@120`) signal only the
batch shell, which touches that file: torchrun and accelerate would die of a SIGUSR1 themselves,
and the file reaches the ranks of every node through the shared run directory.
The ranks decide together after every step (one all-reduce), so they all stop at the same step.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

from pipeline.parallel import distributed

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EXIT_STATUS = 75  # EX_TEMPFAIL: stopped early on purpose; running the command again resumes


class Preempted(Exception):
    """Raised after the checkpoint is written; the runner ends with EXIT_STATUS and runs no later stage."""


class StopRequest:
    """A context that turns SIGUSR1 and SIGTERM into a request to stop after the step (main thread only)."""

    def __init__(self, env=os.environ):
        self.reason: str | None = None
        self.stop_file = Path(env["PIPELINE_STOP_FILE"]) if env.get("PIPELINE_STOP_FILE") else None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name

    def requested(self) -> bool:
        """Collective: True on every rank if any rank was signalled or the stop file exists."""
        if self.reason is None and self.stop_file is not None and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
        return distributed.any_rank(self.reason is not None)

    def clear_stop_file(self) -> None:
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)


def leave_to_main_process(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the workers ignore the stop signals. Slurm signals every process
    of a job step, and a worker killed by one would crash the main process mid-step; the main
    process finishes the step, checkpoints, and shuts its workers down itself."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def log_slurm_restart(env=os.environ) -> None:
    if "SLURM_JOB_ID" in env:
        log.info("Slurm job %s, SLURM_RESTART_COUNT=%s", env["SLURM_JOB_ID"], env.get("SLURM_RESTART_COUNT", 0))


def requeue(env=os.environ) -> bool:
    """`scontrol requeue` this Slurm job (rank 0 only): it goes back to the queue and, started
    again, resumes from the checkpoint just written. False outside Slurm or if Slurm refused."""
    job = env.get("SLURM_JOB_ID")
    if job is None or distributed.rank() != 0:
        return False
    if shutil.which("scontrol") is None:
        log.warning("SLURM_JOB_ID is set but scontrol is not on PATH: job %s not requeued", job)
        return False
    # For slurm/launch.sh: the requeue ends the job step with TERM, and the launcher then reports the
    # ranks' status, EXIT_STATUS, rather than the step's 143. Written first: the requeue may kill us.
    marker = Path(f"{env['PIPELINE_STOP_FILE']}.requeued") if env.get("PIPELINE_STOP_FILE") else None
    if marker is not None:
        marker.touch()
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job, (done.stderr or done.stdout).strip())
        if marker is not None:
            marker.unlink(missing_ok=True)
        return False
    log.info("requeued Slurm job %s", job)
    return True


def preempted(stop: StopRequest, step: int, requeue_job: bool) -> None:
    """After the checkpoint of `step`: requeue the Slurm job if asked, and stop this run."""
    log.warning("preempted after step %d (%s): checkpoint saved", step, stop.reason or "another rank was signalled")
    distributed.on_main(stop.clear_stop_file)
    requeued = distributed.broadcast_object(requeue_job and requeue())  # rank 0 requeues; all say so
    raise Preempted(f"preempted after step {step}; "
                               + ("the Slurm job was requeued" if requeued else "run the same command to resume"))
