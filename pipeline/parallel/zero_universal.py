"""DeepSpeed universal checkpoints: a ZeRO checkpoint's partitions re-cut per parameter, so that it
resumes on another number of processes.

A ZeRO checkpoint holds one flat partition of the optimizer state per rank and refuses to load
at another world size. DeepSpeed's `ds_to_universal` rewrites it as one folder per parameter
(fp32 weights, Adam's exp_avg and exp_avg_sq, step), which any number of ranks can slice again
(`checkpoint.load_universal` in DeepSpeed's config). The conversion runs once, next to the
checkpoint, in `step_<N>/universal/`; a later resume at yet another size reuses it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.errors import UserError

FOLDER = "universal"


def convert(step: Path, tag: str) -> Path:
    """`step/<tag>` (DeepSpeed's checkpoint) as a universal checkpoint in `step/universal/<tag>`;
    returns `step/universal`, the folder to load from with the same tag. Written into
    `universal.tmp` and renamed when complete, so a crash mid-way leaves nothing that looks done.

    DeepSpeed's own command line, in a subprocess: it prints progress and may start worker
    processes, neither of which belongs inside a training process that holds a process group."""
    final, tmp = step / FOLDER, step / f"{FOLDER}.tmp"
    if (final / tag / "zero").is_dir():
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    # --inject_missing_state: the universal-checkpoint info that Megatron-DeepSpeed writes and a
    # plain engine does not (no tensor or pipeline parallelism to describe here).
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step / tag),
               "--output_folder", str(tmp / tag), "--inject_missing_state",
               "--num_extract_workers", str(workers()), "--num_merge_workers", str(workers())]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise UserError(f"DeepSpeed could not convert {step} to a universal checkpoint ({last}); resume with the "
                        f"number of processes that wrote it, or force=true to start over")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def workers() -> int:
    """Parallel extraction in DeepSpeed's converter: a few processes, not more than the cores given."""
    return max(1, min(4, len(os.sched_getaffinity(0)) // 2))
