"""Fail fast: before any stage runs, rank 0 checks what can be checked in seconds, so that a wrong
path or a batch that does not divide is reported at once and not after an hour of sharding.

Each check raises a UserError; `problems` runs those the planned stages need and returns every
message, one line each. The runner prints them and exits with status 2 before it writes anything.
Checked: the dataset folder and its list files (the converter's own reading), free disk for the
shards (from a few images encoded as the shard stage does) and for train.keep_checkpoints + 1
checkpoints, the model (built on the meta device; `model.pretrained` exists, is in the family's
format and its names and shapes fit the architecture), the DeepSpeed JSON, the global batch /
chunk / process arithmetic, and that the run directory can be written. The accelerate YAML is checked by slurm/launch.sh, before the
launcher reads it.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config, ModelConfig
from pipeline.config.backends import backend
from pipeline.errors import UserError
from pipeline.models.weights_file import weights_format  # noqa: F401 - the preflight's name for it
from pipeline.parallel import distributed
from pipeline.parallel.checkpoint_names import check_checkpoint_spec, check_foreign_checkpoint
from pipeline.parallel.shares import check_processes, check_shares
from pipeline.run_dir import RunDir
from pipeline.tracking import check_installed

BUILDS_MODEL = ("embed", "finetune", "export", "eval")


def passes(cfg: Config, rd: RunDir, processes: int, planned: Callable[[], list[str]]) -> bool:
    """Rank 0 runs the checks for the stages planned() says will run, and prints every problem, one line each."""
    found = distributed.on_main(lambda: problems(cfg, rd, processes, planned()))
    if distributed.rank() == 0:
        for problem in found:
            print(f"error: {problem}", file=sys.stderr)
    return not found


def problems(cfg: Config, rd: RunDir, processes: int, stages: list[str]) -> list[str]:
    """Every problem the checks for `stages` (the stages this command will run) find, one line each."""
    checks: list[Callable[[], None]] = [lambda: check_run_dir(rd.root), lambda: check_installed(cfg.track)]
    if "shard" in stages:
        checks.append(lambda: check_data(cfg, rd.root))
    if any(s in stages for s in BUILDS_MODEL):
        checks.append(lambda: check_model(cfg.model))
    if "finetune" in stages:
        checks.append(lambda: check_processes(cfg.parallel.name, processes))
        checks.append(lambda: check_shares(cfg.train, processes))
        checks.append(lambda: check_checkpoint_space(cfg, rd))
        if backend(cfg.parallel.name).deepspeed:
            checks.append(lambda: check_deepspeed_config(cfg))
    if "eval" in stages and "checkpoint" in cfg.eval.models:
        checks.append(lambda: check_checkpoint_spec("eval.checkpoint", cfg.eval.checkpoint))
        checks.append(lambda: check_foreign_checkpoint(cfg.eval.checkpoint))
    if "export" in stages:
        checks.append(lambda: check_checkpoint_spec("export.checkpoint", cfg.export.checkpoint))
    if "eval" in stages and "finetuned" in cfg.eval.models and cfg.eval.export:
        checks.append(lambda: check_export_folder(cfg.eval.export))
    found = []
    for check in checks:
        try:
            check()
        except UserError as e:
            found.append(str(e))
    return found


def check_run_dir(root: Path) -> None:
    """The run directory exists and is writable, or can be made: its nearest existing parent is."""
    existing = _nearest_existing(root)
    if not existing.is_dir():
        raise UserError(f"run_dir={root} cannot be made: {existing} is a file, not a folder; choose another run_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"run_dir={root} is not writable ({existing} is not); choose another run_dir")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_data(cfg: Config, root: Path) -> None:
    """The dataset's folder and list files (read as the shard stage reads them), and room for its shards."""
    from pipeline.data.converters import convert
    from pipeline.data.shards import estimated_size

    splits = convert(cfg.data, cfg.data.seed)  # a missing folder or list file raises here, naming it
    images, need = 0, 0
    for records in splits.values():
        count, size = estimated_size(records, cfg.data.image_size, cfg.data.image_format)
        images, need = images + count, need + size
    existing = _nearest_existing(root)
    free = shutil.disk_usage(existing).free
    if need > free:
        raise UserError(f"the shards of {images} images need about {need / 1e9:.1f} GB (estimated) but {existing} has "
                        f"{free / 1e9:.1f} GB free; free some space or put run_dir on a larger disk")


def check_model(cfg: ModelConfig) -> None:
    """The model can be built and model.pretrained fits it (each family's rules: pipeline/models/<family>/)."""
    from pipeline.models.model_check import check_model as check

    check(cfg)


check_pretrained = check_model  # the name earlier rounds used


def check_export_folder(folder: str) -> None:
    from pipeline.models.encoders import is_exported  # the loader's own test (its config's model keys too)

    if not is_exported(Path(folder).expanduser()):
        raise UserError(f"eval.export={folder} is not an exported model (model.safetensors + config.json); "
                        "give a stage=export folder")


def checkpoint_bytes(cfg: Config, rd: RunDir) -> int:
    """About one checkpoint's size: fp32 weights, the optimizer's state of the trainable ones (Adam's
    two moments, SGD's momentum) and the loss's own state with its optimizer's (proxies, MPN layers;
    counted once the shards give the classes). Built on the meta device: no memory, no weights read."""
    import dataclasses

    import torch

    from pipeline.losses import build_loss
    from pipeline.models.encoders import build_encoder

    moments = 1 if cfg.train.optimizer == "sgd" else 2
    with torch.device("meta"):
        model = build_encoder(dataclasses.replace(cfg.model, pretrained=None), cfg.seed)
        modules = [model]
        if (rd.shards / "train").is_dir():
            from pipeline.data.shards import ShardIndex

            labels = ShardIndex.load(rd.shards / "train").labels.tolist()
            modules.append(build_loss(cfg.loss, cfg.train, labels, model.dim, cfg.seed))
    total = 0
    for module in modules:
        for p in module.parameters():
            total += 4 * p.numel() * (1 + moments * p.requires_grad)
        total += sum(b.numel() * b.element_size() for b in module.buffers())
    return total


def check_checkpoint_space(cfg: Config, rd: RunDir) -> None:
    """Room for train.keep_checkpoints checkpoints, the one being written before the oldest goes, and
    `best` (kept beside them) when validation runs; less what the run's checkpoints already take."""
    from pipeline.disk import free_bytes, gb, nearest_existing

    t = cfg.train
    try:
        each = checkpoint_bytes(cfg, rd)
    except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device: the write reports a full disk
        return
    count = t.keep_checkpoints + 1 + bool(t.val_every)
    have = 0 if cfg.force or not rd.checkpoints.is_dir() else \
        sum(f.stat().st_size for f in rd.checkpoints.rglob("*") if f.is_file())
    need, free = each * count - have, free_bytes(rd.checkpoints)
    if 0 <= free < need:
        raise UserError(f"the checkpoints need about {gb(need)} ({count} of about {gb(each)}: "
                        f"train.keep_checkpoints={t.keep_checkpoints}, the one being written"
                        f"{', the best' if t.val_every else ''}) but {nearest_existing(rd.checkpoints)} has "
                        f"{gb(free)} free; free some space, put run_dir on a larger disk or lower train.keep_checkpoints")


def check_deepspeed_config(cfg: Config) -> None:
    """The DeepSpeed JSON exists and parses (read as the engine reads it)."""
    import torch

    from pipeline.parallel.engine import deepspeed_config

    deepspeed_config(cfg.parallel, cfg.train.chunk_size, torch.device("cpu"))
