"""`model.arch=` means that architecture: where a command names another model.arch (or model.family)
than its preset or run had, the shape keys and normalisation that preset or run set for the old
architecture are dropped (None: the new architecture's own), unless the same command gives them.

Without this, `model.family=timm model.arch=vit_small_patch16_dinov3` kept the default (tiny)
preset's depth 4, patch 8 and normalisation 0.5: a 7M-parameter model no released checkpoint fits."""
from __future__ import annotations

from pipeline.config.schema import Config

SHAPE_KEYS = ("patch_size", "depth", "width", "heads", "mean", "std")  # global_pool: a choice of the preset


def own_architecture(config: Config, before: tuple[str, str], sources: dict[str, str], command_line: str) -> list[str]:
    """Reset the shape keys of `config.model` that came from a preset or the run (not from
    `command_line`) when (family, arch) changed from `before`; returns a note naming them."""
    m = config.model
    if (m.family, m.arch) == tuple(before):
        return []
    label = f"model.arch={m.arch} (the architecture's own)"
    dropped = []
    for key in SHAPE_KEYS:
        leaf = f"model.{key}"
        if sources.get(leaf) == command_line or getattr(m, key) is None:
            continue
        dropped.append(f"{key}={getattr(m, key)}")
        setattr(m, key, None)
        sources[leaf] = label
    if not dropped:
        return []
    note = (f"model.arch={m.arch}: {', '.join(dropped)} of {before[1]} dropped (the architecture's own values "
            f"apply; give them on the command line to keep them)")
    return [note]
