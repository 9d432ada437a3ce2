"""A transformers model's normalisation: its folder's image processor (preprocessor_config.json; for
hub:<org/name> the cached copy), else the model's defaults (models.py)."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import ModelConfig
from pipeline.models.backbone import hub_name, pretrained_path
from pipeline.models.transformers.models import spec


def preprocessing(cfg: ModelConfig) -> tuple[list[float], list[float]]:
    import transformers.image_utils as constants

    default = spec(cfg).normalisation
    mean, std = getattr(constants, f"{default}_MEAN"), getattr(constants, f"{default}_STD")
    processor = _processor_file(cfg) if cfg.pretrained else None
    if processor is not None:
        values = json.loads(processor.read_text())
        mean, std = values.get("image_mean", mean), values.get("image_std", std)
    return list(mean), list(std)


def _processor_file(cfg: ModelConfig) -> Path | None:
    hub_id = hub_name(cfg)
    if hub_id is None:
        path = pretrained_path(cfg, folder=True) / "preprocessor_config.json"
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id, "preprocessor_config.json")
    return Path(found) if isinstance(found, str) else None
