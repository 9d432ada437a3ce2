"""The preflight's rule for timm weights: a weights file (safetensors or torch.save's format) whose
names and shapes, after timm's own filter for the architecture (DINOv2/DINOv3/PE key names, position
embeddings resampled to model.image_size), are those of the model; or a pretrained tag timm knows.
Read from the file's header (safetensors) or its pickle (torch.save, memory-mapped), against the
model built on the meta device: no weights are loaded."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.models.backbone import hub_name
from pipeline.models.timm.build import create_kwargs, model_name
from pipeline.models.weights_file import check_weights_file, first_mismatch, meta_state


def check_pretrained(cfg: ModelConfig) -> None:
    if hub_name(cfg) is not None:
        cached = cached_file(cfg)
        if cached is not None:
            check_fits(cfg, cached)
        return
    path = Path(cfg.pretrained).expanduser()
    check_weights_file(cfg, path, "timm", "model.safetensors")
    check_fits(cfg, path)


def cached_file(cfg: ModelConfig) -> Path | None:
    """The weights of hub:<tag> where the Hugging Face cache already holds them (None: timm downloads them)."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    hub_id = timm.get_pretrained_cfg(model_name(cfg)).hf_hub_id
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename) if hub_id else None
        if isinstance(found, str):
            return Path(found)
    return None


def check_fits(cfg: ModelConfig, path: Path) -> None:
    import timm

    with torch.device("meta"):
        model = timm.create_model(cfg.arch, **create_kwargs(cfg))
    state = _unwrap(meta_state(path))
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            with torch.device("meta"):
                state = filter_fn(state, model)
        except Exception:  # noqa: BLE001 - a filter that needs the data: the build itself reports a misfit
            return
    expected = model.state_dict()
    head = (model.pretrained_cfg or {}).get("classifier") or "head"
    for name in [k for k in state if k not in expected and k.split(".")[0] == head.split(".")[0]]:
        state.pop(name)  # timm drops the classifier of another number of classes (num_classes=0 here)
    problem = first_mismatch(expected, state)
    if problem:
        raise UserError(f"model.pretrained={cfg.pretrained} does not fit timm {cfg.arch}: {problem}; "
                        f"give that model's weights or set model.arch and its shape keys to the file's")


def _unwrap(state: dict) -> dict:
    """timm's load_state_dict: the 'state_dict' or 'model' entry of a training checkpoint, no 'module.' prefix."""
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
