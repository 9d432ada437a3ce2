"""Layer-wise learning-rate decay (train.layer_decay = d; 1.0 = off), as ViTs are finetuned (BEiT, the
DINOv2/EVA recipes, timm's `--layer-decay`): the earlier a layer, the smaller its learning rate, so
the early blocks keep what pretraining learned.

The rule is timm's (`timm.optim.param_groups_layer_decay`, used as is for a timm tower): with L
blocks, the embeddings (everything before the first block) are layer 0, block i is layer i + 1,
and what follows the blocks shares the last block's layer L; a parameter of layer l learns at
lr x d^(L - l). So the embeddings run at d^L, block i at d^(L-1-i), the last block, the final norm
and the embedding head undecayed (the head keeps train.head_lr). BEiT's own code counts one layer
more (its last block at d); timm's convention is the one kept.

For towers timm does not build (open_clip, transformers, or any tower wrapped by peft) the same
rule is applied to the encoder's modules: the blocks are the repeated blocks that
`transformer_blocks` finds in any tower (found by module, so the names peft or FSDP2 give do not
matter), and what follows them are the backbone's `after_blocks` (each family's own list, the one
`model.trainable_blocks` uses); every other backbone parameter is an embedding.
"""
from __future__ import annotations

import logging

from torch import nn

from pipeline.parallel.engine import transformer_blocks

log = logging.getLogger(__name__)


def lr_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """{name: lr multiplier} for the trainable parameters of an encoder (an Embedder: `backbone` and
    `head`); {} when decay is 1 or the model has no backbone (a loss's own parameters)."""
    backbone = getattr(model, "backbone", None)
    if decay == 1.0 or backbone is None:
        return {}
    depth = _timm_layers(backbone) or _generic_layers(backbone, getattr(model, "after_blocks", ()))
    layers = max(depth.values(), default=0)
    scales = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            layer = depth.get(id(param), layers)  # not in the backbone (the head): undecayed
            scales[name] = decay ** (layers - layer)
    _log_once(scales, decay)
    return scales


def _timm_layers(backbone: nn.Module) -> dict[int, int] | None:
    """id(parameter) -> layer by timm's own grouping (its models' group_matcher); None for other towers."""
    if not type(backbone).__module__.startswith("timm.") or not hasattr(backbone, "group_matcher"):
        return None
    from timm.models import group_parameters

    by_name = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
    top = max(by_name.values())
    return {id(p): by_name.get(name, top) for name, p in backbone.named_parameters()}


def _generic_layers(backbone: nn.Module, after_blocks: tuple[str, ...]) -> dict[int, int]:
    """The same rule on any tower: blocks by module, the layers after them by the family's names
    (relative to the unwrapped tower: peft's `get_base_model`), embeddings the rest."""
    blocks = transformer_blocks(backbone)
    layer = {}
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    for name, param in base.named_parameters():
        after = any(name == p or name.startswith(p + ".") for p in after_blocks)
        layer[id(param)] = len(blocks) if after else 0
    for i, block in enumerate(blocks):
        for param in block.parameters():
            layer[id(param)] = i + 1
    return layer


def _log_once(scales: dict[str, float], decay: float) -> None:
    """One line: each distinct lr multiplier and how many parameter tensors have it."""
    counts: dict[float, int] = {}
    for scale in scales.values():
        counts[scale] = counts.get(scale, 0) + 1
    log.info("train.layer_decay=%g: lr multipliers (tensors) %s", decay,
             ", ".join(f"{s:.3g} ({n})" for s, n in sorted(counts.items())))
