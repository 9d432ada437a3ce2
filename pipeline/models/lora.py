"""LoRA through the peft library (model.lora.rank > 0): low-rank adapters on the backbone's projections;
the base weights are frozen, only the adapters and the embedding head train.

Default targets (model.lora.targets unset): every nn.Linear inside the encoder's repeated blocks
(the blocks each family names in its Backbone, so any timm, open_clip or transformers tower): the
attention's qkv/query/key/value and output projections and the MLP's two layers; an nn.MultiheadAttention (open_clip's own ViT)
is targeted whole, as peft's LoRA for it covers its in- and output projections (its out_proj is
never called as a module, so a LoRA on it alone would be ignored). model.lora.targets takes peft's
`target_modules` names instead (e.g. [qkv, proj]).

The adapters are initialised under the model's seed, so the same seed and config give the same
model; B = 0 at the start (peft's default), so the adapted encoder starts as the frozen one. LoRA
dropout draws from torch's generator, which the two-pass step seeds per chunk: pass 2 replays pass 1.
A checkpoint holds only what trains (`trains_only_adapters`); the frozen base is rebuilt from the
config and seed. The export merges the adapters into the base weights (`merge`), so the exported
encoder is a plain model of its library.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pipeline.config import ModelConfig


def default_targets(backbone: nn.Module, blocks: nn.ModuleList) -> list[str]:
    """The full names (in `backbone`) of the blocks' nn.Linear and nn.MultiheadAttention modules."""
    prefixes = tuple(name + "." for name, module in backbone.named_modules() if any(module is b for b in blocks))
    inside_attention = {id(m) for module in backbone.modules() if isinstance(module, nn.MultiheadAttention)
                        for m in module.modules() if m is not module}
    return [name for name, module in backbone.named_modules()
            if name.startswith(prefixes) and id(module) not in inside_attention
            and isinstance(module, (nn.Linear, nn.MultiheadAttention))]


def apply(model: nn.Module, blocks: nn.ModuleList, cfg: ModelConfig, seed: int) -> None:
    """Wrap model.backbone with peft's LoRA when model.lora.rank > 0 (adapters drawn under `seed`);
    `blocks`: the backbone's transformer blocks (pipeline/models/<family>/build.py: each family names them)."""
    lora = cfg.lora
    if not lora.rank:
        return
    import peft

    targets = list(lora.targets) if lora.targets else default_targets(model.backbone, blocks)
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                             bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # not the stream the head was drawn from
        model.backbone = peft.get_peft_model(model.backbone, config)
    model.trains_only_adapters = True


def merge(model: nn.Module, cfg: ModelConfig) -> tuple[nn.Module, ModelConfig]:
    """(the model with its adapters merged into the base weights and peft's wrapper gone, the config of
    that plain model); the model and config unchanged without LoRA."""
    if not cfg.lora.rank:
        return model, cfg
    model.backbone = model.backbone.merge_and_unload()
    model.trains_only_adapters = False
    return model, dataclasses.replace(cfg, lora=type(cfg.lora)())
