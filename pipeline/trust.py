"""Which files may be unpickled. Unpickling runs whatever code a file carries, so the project reads
its own files without it: torch.load(weights_only=True) (tensors, containers and plain values: RNG
states are saved in that form); DCP checkpoints once their `.metadata`, which DCP unpickles, was
read by an unpickler that builds only DCP's own metadata classes, and their non-tensor items
(optimizer settings, scheduler state) loaded with weights_only=True. A file that needs more, such
as weights or a checkpoint from elsewhere holding arbitrary objects, is refused in one line unless
train.trust_checkpoint=true, which the runner sets for the process (`allow_pickle`).

The exception: DeepSpeed reads its own checkpoint files (`step_<N>/zero/`, `universal/`) with
pickle. The pipeline reads them from its own run directory; a ZeRO checkpoint from elsewhere
(`eval.checkpoint=<folder>`) needs train.trust_checkpoint=true (pipeline/preflight.py).
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from pipeline.errors import UserError

_allowed = False


def allow_pickle(allowed: bool) -> None:
    """train.trust_checkpoint: load files that need pickle, from wherever they come."""
    global _allowed
    _allowed = allowed


def pickle_allowed() -> bool:
    return _allowed


def refused(path: Path | str, what: str, error: Exception | None = None) -> UserError:
    """The one line for a file that needs pickle, naming the objects it holds where torch can tell."""
    held = re.findall(r"GLOBAL ([\w.]+)", str(error or ""))  # torch's weights_only message names the first
    if not held and Path(path).is_file():
        try:
            held = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - not a torch.save zip file
            pass
    return UserError(f"{what} {path} needs pickle to load ({', '.join(held) or 'objects other than tensors'}), which "
                     f"runs any code the file carries; if you trust where it came from, set train.trust_checkpoint=true")


def torch_load(path: Path, what: str) -> Any:
    """torch.load on the CPU: tensors and plain values only, unless pickle is allowed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not _allowed)
    except pickle.UnpicklingError as e:
        raise refused(path, what, e) from None


# What DCP's .metadata may build: its own metadata classes, torch sizes, dtypes and layouts, paths.
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
                ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype_or_layout = module == "torch" and isinstance(getattr(torch, name, None),
                                                           (torch.dtype, torch.layout, torch.memory_format))
        if module == "torch.distributed.checkpoint.metadata" or dtype_or_layout or (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not part of a DCP checkpoint's metadata")


def check_dcp_metadata(folder: Path) -> None:
    """DCP reads `.metadata` with pickle.load: it is read here first with _MetadataUnpickler."""
    path = Path(folder) / ".metadata"
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise refused(path, "checkpoint metadata", e) from None


class _Planner(DefaultLoadPlanner):
    """DefaultLoadPlanner, whose non-tensor items (optimizer settings, scheduler state) are first
    checked to load with weights_only=True (the default planner unpickles them)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise refused(self.folder, f"item {read_item.dest_index.fqn} of checkpoint", e) from None
        value.seek(0)
        super().load_bytes(read_item, value)


def load_dcp(folder: Path, state: dict, no_dist: bool = True) -> None:
    """dcp.load into `state`; unless pickle is allowed, its metadata and non-tensor items are first
    checked to need none, and a refusal is one line (DCP would wrap it in a CheckpointException)."""
    if _allowed:
        dcp.load(state, checkpoint_id=str(folder), no_dist=no_dist)
        return
    check_dcp_metadata(folder)
    try:
        dcp.load(state, checkpoint_id=str(folder), no_dist=no_dist, planner=_Planner(folder))
    except CheckpointException as e:
        raise _unwrapped(e) from None


def _unwrapped(error: Exception) -> Exception:
    """DCP wraps what a rank raised in a CheckpointException: our refusal, if it is one of them."""
    for failure in getattr(error, "failures", {}).values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, UserError):
            return cause
    return error
