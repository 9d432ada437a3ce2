"""A weights file's names and shapes, read without its data, and the first place where they do not
fit a model: what the preflight compares before any stage runs (a 7B checkpoint costs no memory)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.trust import pickle_allowed, refused


def weights_format(path: Path) -> str | None:
    """'safetensors', 'zip' (torch.save since torch 1.6, numpy .npz), 'pickle' (older torch.save), or None."""
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) == 9 and int.from_bytes(head[:8], "little") < size and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    return None


def check_weights_file(cfg, path: Path, family: str, example: str) -> None:
    """model.pretrained is one weights file (safetensors or torch.save), as timm and open_clip load them;
    `example` names the family's usual file in the message."""
    if path.is_dir():
        raise UserError(f"model.pretrained={cfg.pretrained} is a folder; {family} needs the weights file (e.g. {example})")
    if weights_format(path) is None:
        raise UserError(f"model.pretrained={cfg.pretrained} is neither a safetensors file nor a torch.save file; "
                        f"give the {family} checkpoint file")


def meta_state(path: Path, label: str = "model.pretrained") -> dict[str, torch.Tensor]:
    """The file's tensors as meta tensors of their shapes and dtypes: safetensors from its header,
    torch.save files memory-mapped (only the pickle is read). Nested dicts ({'state_dict': ...},
    {'model': ...}) are kept as they are, for the library's own filters to unwrap."""
    if weights_format(path) == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
            return {k: _meta(s.get_shape(), s.get_dtype()) for k, s in slices.items()}
    try:
        state = torch.load(path, map_location="cpu", mmap=weights_format(path) == "zip",
                           weights_only=not pickle_allowed())
    except pickle.UnpicklingError as e:
        raise refused(path, label, e) from None
    return _to_meta(state)


def _meta(shape, dtype: str) -> torch.Tensor:
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    return torch.empty(list(shape), dtype=dtypes.get(dtype, torch.float32), device="meta")


def _to_meta(node):
    if torch.is_tensor(node):
        return torch.empty(node.shape, dtype=node.dtype, device="meta")
    if isinstance(node, dict):
        return {k: _to_meta(v) for k, v in node.items()}
    return node


def sharded_index(folder: Path) -> list[Path]:
    """The safetensors files of a transformers folder (one, or the shards its index names)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []


def first_mismatch(model: dict[str, torch.Tensor], found: dict[str, torch.Tensor], extra_allowed: bool = False) -> str | None:
    """Where the file's (name -> tensor) first differs from the model's: a name the model has and the
    file lacks, a shape, or (unless extra_allowed) a name the model does not have; None if they fit."""
    for name, tensor in model.items():
        if name not in found:
            return f"{name} {list(tensor.shape)} is not in the file"
        if tuple(found[name].shape) != tuple(tensor.shape):
            return f"{name} is {list(found[name].shape)} in the file, {list(tensor.shape)} in the model"
    if not extra_allowed:
        extra = [name for name in found if name not in model]
        if extra:
            return f"the file has {extra[0]} {list(getattr(found[extra[0]], 'shape', []))}, which the model has not" + \
                (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    return None
