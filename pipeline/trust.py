"""Which files may be unpickled. Unpickling runs whatever code a file carries, so the project reads
its own files without it: torch.load(weights_only=True) (tensors, containers and plain values: RNG
states are saved in that form), and DCP's `.metadata` through an unpickler that only builds DCP's
own metadata classes. A file that needs more, such as weights or a checkpoint from elsewhere holding
arbitrary objects, is refused in one line unless train.trust_checkpoint=true, which the runner sets
for the process (`allow_pickle`).

The exception: DeepSpeed reads its own checkpoint files (`step_<N>/zero/`, `universal/`) with
pickle. The pipeline reads them from its own run directory; a ZeRO checkpoint from elsewhere
(`eval.checkpoint=<folder>`) needs train.trust_checkpoint=true (pipeline/preflight.py).
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta

from pipeline.errors import UserError

_allowed = False


def allow_pickle(allowed: bool) -> None:
    """train.trust_checkpoint: load files that need pickle, from wherever they come."""
    global _allowed
    _allowed = allowed


def pickle_allowed() -> bool:
    return _allowed


def refused(path: Path | str, what: str, error: Exception | None = None) -> UserError:
    """The one line for a file that needs pickle, naming what it holds where torch can tell."""
    held = ""
    try:
        held = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - not a torch.save zip file: say what the error said
        held = str(error).splitlines()[0] if error else ""
    return UserError(f"{what} {path} needs pickle to load ({held or 'objects other than tensors'}), which runs any code "
                     f"the file carries; if you trust where it came from, set train.trust_checkpoint=true")


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
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")


class _Reader(FileSystemReader):
    """FileSystemReader whose .metadata is read by _MetadataUnpickler instead of pickle.load."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise refused(path, "checkpoint metadata", e) from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


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


def dcp_load_options(folder: Path) -> dict:
    """dcp.load's storage_reader and planner: restricted unless pickle is allowed."""
    if _allowed:
        return {"storage_reader": FileSystemReader(str(folder)), "planner": DefaultLoadPlanner()}
    return {"storage_reader": _Reader(str(folder)), "planner": _Planner(folder)}
