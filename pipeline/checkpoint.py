"""Checkpoints `run_dir/checkpoints/step_<N>/` through torch.distributed.checkpoint, and `latest`.

A checkpoint is written into `step_<N>.tmp`, renamed when complete, and only then does `latest`
name it; older ones beyond `keep` are removed. `meta.json` records the model's architecture, so
a checkpoint from another model is refused with a clear message instead of a shape error.
"""
from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from pipeline.errors import UserError
from pipeline.run_dir import write_json

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler=None) -> dict:
    if optimizer is None:
        return {"model": get_state_dict(model, [])[0]}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state, "scheduler": scheduler.state_dict()}


def _with_loss(state: dict, loss: tuple | None) -> dict:
    """The loss's own state (module, optimizer or None, scheduler), under the key `loss`; none for RS@k."""
    return state if loss is None or not loss[0].state_dict() else {**state, "loss": _state(*loss)}


def save(folder: Path, step: int, model: nn.Module, optimizer, scheduler, meta: dict, keep: int,
         loss: tuple | None = None) -> Path:
    final = folder / f"step_{step}"
    tmp = folder / f"step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dcp.save(_with_loss(_state(model, optimizer, scheduler), loss), checkpoint_id=str(tmp))
    write_json(tmp / "meta.json", {**meta, "step": step})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (folder / "latest.tmp").write_text(final.name)
    (folder / "latest.tmp").replace(folder / "latest")
    for old in sorted(folder.glob("step_*[0-9]"), key=lambda p: int(p.name[5:]))[:-keep]:
        shutil.rmtree(old)
    log.info("checkpoint %s", final)
    return final


def latest(folder: Path) -> Path | None:
    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    path = folder / pointer.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def load(path: Path, model: nn.Module, optimizer=None, scheduler=None, expect_model: dict | None = None,
         loss: tuple | None = None) -> dict:
    """Load in place; returns meta.json (with `step`). Pass optimizer=None to load the weights only;
    loss=(module, optimizer, scheduler) also loads the loss's parameters saved with them."""
    meta = json.loads((path / "meta.json").read_text())
    if expect_model is not None and meta.get("model") != expect_model:
        diff = sorted(k for k in expect_model if meta.get("model", {}).get(k) != expect_model[k])
        raise UserError(f"checkpoint {path} was made by another model config (differs in model.{', model.'.join(diff)}); "
                        f"use another run_dir, or force=true to start over")
    if loss is not None and meta.get("loss") != expect_loss(loss[0]):
        made = (meta.get("loss") or {}).get("class", "unrecorded")
        raise UserError(f"checkpoint {path} was made with another loss ({made}, or other loss settings); "
                        f"use another run_dir, or force=true to start over")
    state = _with_loss(_state(model, optimizer, scheduler), loss)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer or [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if "loss" in state:
        set_state_dict(loss[0], loss[1] or [], model_state_dict=state["loss"]["model"],
                       optim_state_dict=state["loss"].get("optim", {}))
        if loss[2] is not None:
            loss[2].load_state_dict(state["loss"]["scheduler"])
    return meta


def expect_loss(loss_fn: nn.Module) -> dict:
    """What a checkpoint records of the loss: its class and the shapes of its saved state."""
    return {"class": type(loss_fn).__name__,
            "state": {k: list(v.shape) for k, v in loss_fn.state_dict().items()}}
