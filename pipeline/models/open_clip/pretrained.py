"""The preflight's rule for open_clip weights: a full CLIP checkpoint file (safetensors or torch.save's
format) whose image tower has the names and shapes of the tower model.arch builds (after the
position-embedding resize for model.image_size), read without its data against the tower built on
the meta device; or a pretrained tag open_clip knows for model.arch."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.models.backbone import hub_name, pretrained_path
from pipeline.models.open_clip.tower import build_tower, tower_state, unwrap
from pipeline.models.weights_file import check_weights_file, first_mismatch, meta_state


def weights_file(cfg: ModelConfig, download: bool = True) -> Path | None:
    """model.pretrained's file: the local path, or open_clip's download of hub:<tag> (its cached copy
    when HF_HUB_OFFLINE=1; None when not cached and `download` is false)."""
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    tag = hub_name(cfg)
    if tag is None:
        return pretrained_path(cfg)
    source = get_pretrained_cfg(cfg.arch, tag)
    if not source:
        raise UserError(f"model.pretrained={cfg.pretrained}: open_clip has no weights {tag} for {cfg.arch}; its tags: "
                        f"{', '.join(open_clip.list_pretrained_tags_by_model(cfg.arch)) or 'none'}")
    if not download:
        return _cached(source)
    try:
        return Path(download_pretrained(source))
    except (FileNotFoundError, RuntimeError, OSError) as e:
        raise UserError(f"model.pretrained={cfg.pretrained}: open_clip could not fetch the weights "
                        f"({str(e).splitlines()[0]}); check the network or the Hugging Face cache (HF_HOME)") from None


def _cached(source: dict) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    if not source.get("hf_hub"):
        return None
    repo, filename = source["hf_hub"].rstrip("/").rsplit("/", 1) if not source["hf_hub"].endswith("/") \
        else (source["hf_hub"].rstrip("/"), "")
    for name in ([filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]):
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return Path(found)
    return None


def check_pretrained(cfg: ModelConfig) -> None:
    path = weights_file(cfg, download=False)
    if path is None:
        return  # hub:<tag> not cached yet: open_clip downloads it at the build
    check_weights_file(cfg, path, "open_clip", "open_clip_model.safetensors or open_clip_pytorch_model.bin")
    with torch.device("meta"):
        visual = build_tower(cfg)
        found = tower_state(unwrap(meta_state(path)), visual)
    problem = first_mismatch(visual.state_dict(), found)
    if problem:
        raise UserError(f"model.pretrained={cfg.pretrained} does not fit open_clip {cfg.arch}: {problem}; "
                        f"give that model's checkpoint or set model.arch and its shape keys to the file's")
