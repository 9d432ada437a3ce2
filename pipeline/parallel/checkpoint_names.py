"""What a checkpoint may be named as on the command line (eval.checkpoint, export.checkpoint): latest,
best, step_<N> of the run, or a folder; checked before any stage runs (pipeline/preflight.py)."""
from __future__ import annotations

import difflib
import json
from pathlib import Path

from pipeline.errors import UserError
from pipeline.run_dir import names_run_checkpoint
from pipeline.trust import pickle_allowed


def check_checkpoint_spec(key: str, spec: str) -> None:
    """latest, best, step_<N>, or an existing folder: a typo (`bestt`) is named before any stage runs."""
    if names_run_checkpoint(spec) or Path(spec).expanduser().is_dir():
        return
    hint = difflib.get_close_matches(spec, ["latest", "best"], n=1)
    raise UserError(f"{key}={spec} is neither latest, best, step_<N> nor a checkpoint folder"
                    + (f"; did you mean '{hint[0]}'?" if hint else ""))


def check_foreign_checkpoint(spec: str) -> None:
    """eval.checkpoint=<folder>: a checkpoint from elsewhere. DeepSpeed reads its files with pickle,
    so a ZeRO one needs train.trust_checkpoint=true (the project's own DCP format never does)."""
    if names_run_checkpoint(spec):
        return  # this run's own
    try:
        fmt = json.loads((Path(spec).expanduser() / "meta.json").read_text()).get("format", "dcp")
    except (OSError, ValueError):
        return  # not a checkpoint folder: the eval stage says so
    if fmt == "deepspeed" and not pickle_allowed():
        raise UserError(f"eval.checkpoint={spec} is a DeepSpeed checkpoint from outside this run, and DeepSpeed reads "
                        f"its files with pickle, which runs any code they carry; if you trust where it came from, "
                        f"set train.trust_checkpoint=true")
