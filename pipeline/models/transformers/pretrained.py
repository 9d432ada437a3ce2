"""The preflight's rule for transformers weights: a from_pretrained folder (config.json and weights) of
a model_type that model.arch loads, whose safetensors weights transformers itself loads onto the
model its config (with the user's overrides) builds on the meta device, none missing, none of
another shape; a hub id is checked where the Hugging Face cache holds it. A full model's folder (a
SigLIP 2 with its text tower) may hold more."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.models.backbone import hub_name
from pipeline.models.transformers.build import classes
from pipeline.models.transformers.loading import loading_problem
from pipeline.models.transformers.models import config_overrides
from pipeline.models.weights_file import sharded_index

# A transformers from_pretrained folder: its config and one of these weight files.
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_pretrained(cfg: ModelConfig) -> None:
    hub_id = hub_name(cfg)
    path = _cached_snapshot(hub_id) if hub_id else Path(cfg.pretrained).expanduser()
    if path is None:
        return  # not cached yet: transformers downloads it at the build
    if not path.is_dir():
        raise UserError(f"model.pretrained={cfg.pretrained} is a file; transformers needs the from_pretrained "
                        f"folder that holds config.json and the weights")
    if not any((path / name).is_file() for name in HF_WEIGHTS):
        raise UserError(f"model.pretrained={cfg.pretrained} has no weights ({', '.join(HF_WEIGHTS)}); "
                        f"give a folder written by save_pretrained or a hub snapshot")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        raise UserError(f"model.pretrained={cfg.pretrained} has no readable config.json; "
                        f"give a folder written by save_pretrained or a hub snapshot") from None
    s, model_cls, _ = classes(cfg)
    if model_type not in s.model_types:
        raise UserError(f"model.pretrained={cfg.pretrained} holds a {model_type} model, not a {cfg.arch}; "
                        f"give that model's folder or change model.arch")
    _check_fits(cfg, path, model_cls, config_overrides(cfg, s))


def _cached_snapshot(hub_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def _check_fits(cfg: ModelConfig, folder: Path, model_cls, overrides: dict) -> None:
    """transformers' own loading (its key renaming, a full model's prefix) onto the meta device: what it
    would leave randomly initialised or could not load."""
    if not sharded_index(folder):
        return  # .bin weights only: read at the build (they may need train.trust_checkpoint)
    try:
        _, info = model_cls.from_pretrained(str(folder), device_map="meta", output_loading_info=True,
                                            ignore_mismatched_sizes=True, **overrides)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"model.pretrained={cfg.pretrained}: {str(e).splitlines()[0]}") from None
    problem = loading_problem(info)
    if problem:
        raise UserError(f"model.pretrained={cfg.pretrained} does not fit transformers {cfg.arch}: {problem}; "
                        f"give that model's folder or leave the model's shape keys unset")
