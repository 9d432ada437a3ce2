"""Checkpoints `run_dir/checkpoints/step_<N>/` through torch.distributed.checkpoint, and `latest`.

A checkpoint is written into `step_<N>.tmp`, renamed when complete, and only then does `latest`
name it; older ones beyond `keep` are removed. `meta.json` records the model's architecture, so
a checkpoint from another model is refused with a clear message instead of a shape error.

Under parallel=none, ddp and fsdp2 the payload is a DCP checkpoint, which any of the three
resumes at any number of processes (DCP reshards on load). Under DeepSpeed ZeRO it is DeepSpeed's
own (`save_checkpoint`, one partition per rank), which the same parallel= resumes; at another
number of processes (meta.json's "world_size") it is first converted once to a DeepSpeed universal
checkpoint (pipeline/parallel/zero_universal.py). The export consolidates it with DeepSpeed's
zero_to_fp32. A loss with its own state (proxies, MPN layers:
replicated on every rank, never wrapped by the backend) is saved beside it, in `loss/`, through DCP.

Each rank's RNG states go in `rng/rank_<r>.pt`. The data position is the step itself: the sampler's
batch at step t is a function of (seed, t) alone. `meta.json` is written last and lists every file
with its size, so a checkpoint truncated by a crash or a full disk is recognised, and resuming falls
back to the newest intact one with a warning.

`best` names the checkpoint with the best validation value (pipeline/train/validation.py), as `latest`
names the newest; `keep` never removes the one it names.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from pipeline import disk, trust
from pipeline.config.backends import TABLE
from pipeline.parallel import distributed
from pipeline.parallel.checkpoint_names import names_run_checkpoint
from pipeline.errors import UserError
from pipeline.run_dir import write_json

log = logging.getLogger(__name__)
BEST = "best"
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")


def only_what_trains(model: nn.Module) -> bool:
    """A LoRA model (pipeline/models/lora.py) saves and loads only what trains: its frozen base is
    rebuilt from the config and seed, so its checkpoints stay small (every backend's)."""
    return getattr(model, "trains_only_adapters", False)


def _options(model: nn.Module) -> StateDictOptions | None:
    return StateDictOptions(ignore_frozen_params=True, strict=False) if only_what_trains(model) else None


def check_complete(model: nn.Module, names) -> None:
    """A checkpoint's weights cover the model: every tensor, or for a LoRA model every one that trains
    (the frozen base is the model's own); raises with the names it lacks."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad} if only_what_trains(model) else set()
    missing = sorted(set(model.state_dict()) - set(names) - frozen)
    if missing:
        raise UserError(f"the checkpoint lacks {len(missing)} of the model's tensors ({', '.join(missing[:3])}, ...): "
                        "it was written by another model; use another run_dir, or force=true to start over")


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler=None) -> dict:
    if optimizer is None:
        return {"model": get_state_dict(model, [], options=_options(model))[0]}
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(model))
    return {"model": model_state, "optim": optim_state, "scheduler": scheduler.state_dict()}


def save_dcp(folder: Path, model: nn.Module, optimizer, scheduler) -> None:
    """Model, optimizer and scheduler through DCP (collective: each rank writes its shards)."""
    dcp.save(_state(model, optimizer, scheduler), checkpoint_id=str(folder))


def load_dcp(folder: Path, model: nn.Module, optimizer=None, scheduler=None, no_dist: bool = False) -> None:
    state = _state(model, optimizer, scheduler)
    trust.load_dcp(folder, state, no_dist)
    set_state_dict(model, optimizer or [], model_state_dict=state["model"], optim_state_dict=state.get("optim", {}),
                   options=_options(model))
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])


def save(folder: Path, step: int, engine, meta: dict, keep: int, loss: tuple | None = None, best: bool = False) -> Path:
    """Collective under several processes: every rank writes its part; rank 0 publishes the folder.
    loss=(module, optimizer or None, scheduler or None) saves the loss's own state too; best=True
    points `best` at it. A full disk (or a read-only one) ends in a WriteFailed naming the checkpoint
    a rerun resumes from, with the partial step_<N>.tmp removed."""
    with disk.writing(f"checkpoint step_{step}", folder, partial=folder / f"step_{step}.tmp",
                      then=lambda: resumes_from(folder)):
        return _save(folder, step, engine, meta, keep, loss, best)


def resumes_from(folder: Path) -> str:
    last = latest(folder)
    return (f"the same command resumes from {last.name}, the last complete checkpoint" if last is not None
            else "the same command starts training over (no complete checkpoint yet)")


def _save(folder: Path, step: int, engine, meta: dict, keep: int, loss: tuple | None, best: bool) -> Path:
    final = folder / f"step_{step}"
    tmp = folder / f"step_{step}.tmp"
    distributed.on_main(lambda: shutil.rmtree(tmp, ignore_errors=True))
    engine.save(tmp)
    if _has_state(loss):
        save_dcp(tmp / "loss", *loss)
    save_rng(tmp / "rng")
    distributed.barrier()
    loss_meta = {"loss": expect_loss(loss[0])} if loss is not None else {}

    def publish() -> None:
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        write_json(tmp / "meta.json", {**meta, **loss_meta, "step": step, "format": engine.checkpoint_format,
                                        "world_size": distributed.world_size(), "files": files})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (folder / "latest.tmp").write_text(final.name)
        (folder / "latest.tmp").replace(folder / "latest")
        if best:
            point_best(folder, final.name)
        protected = best_checkpoint(folder)
        for old in sorted(folder.glob("step_*[0-9]"), key=lambda p: int(p.name[5:]))[:-keep]:
            if old != protected:
                shutil.rmtree(old)
        log.info("checkpoint %s", final)

    distributed.on_main(publish)
    return final


def remove_partial(folder: Path) -> None:
    """What a killed writer left half-written (step_<N>.tmp, latest.tmp, best.tmp); safe because the run
    directory's lock (pipeline/run_lock.py) makes this command its only writer. Rank 0 only."""
    for tmp in folder.glob("*.tmp") if folder.is_dir() else []:
        disk.remove(tmp)


def point_best(folder: Path, name: str | None) -> None:
    """`best` names checkpoint `name` (None: no best yet); replaced atomically. Rank 0 only."""
    pointer = folder / BEST
    if name is None:
        pointer.unlink(missing_ok=True)
        return
    (folder / "best.tmp").write_text(name)
    (folder / "best.tmp").replace(pointer)


def update_meta(path: Path, fields: dict) -> None:
    """Change fields of a published checkpoint's meta.json (not among the files it lists). Rank 0 only."""
    meta = json.loads((path / "meta.json").read_text())
    write_json(path / "meta.json", {**meta, **fields})


def best_checkpoint(folder: Path) -> Path | None:
    """The checkpoint `best` names, if any."""
    pointer = folder / BEST
    return folder / pointer.read_text().strip() if pointer.is_file() else None


def find(spec: str, folder: Path) -> Path:
    """A checkpoint by name, as eval.checkpoint and export.checkpoint give it: latest (the newest
    intact one), best, step_<N> in `folder`, or a checkpoint folder anywhere."""
    if spec == "latest":
        path = latest(folder)
        if path is None:
            raise UserError(f"no checkpoint in {folder}; run stage=finetune first")
        return path
    if spec == BEST:
        path = best_checkpoint(folder)
        if path is None:
            raise UserError(f"{folder} has no best checkpoint: validation never ran (train.val_every=0?); "
                            f"use latest or step_<N>")
    else:
        path = folder / spec if names_run_checkpoint(spec) else Path(spec).expanduser()
    if not (path / "meta.json").is_file():
        raise UserError(f"checkpoint '{spec}': {path} is not a checkpoint folder (no meta.json); "
                        f"use latest, best, step_<N> or a path to one")
    problem = damage(path)
    if problem is not None:
        raise UserError(f"checkpoint '{spec}' ({path}) is unusable: {problem}; use another one")
    return path


def latest(folder: Path) -> Path | None:
    """The checkpoint to resume from: the one `latest` names, else (with a warning) the newest intact one."""
    pointer = folder / "latest"
    named = folder / pointer.read_text().strip() if pointer.is_file() else None
    steps = sorted(folder.glob("step_*[0-9]"), key=lambda p: int(p.name[5:]), reverse=True) if folder.is_dir() else []
    for path in [named] * (named is not None) + [p for p in steps if p != named]:
        problem = damage(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is unusable (%s); falling back to an earlier one", path.name, problem)
    return None


def damage(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (missing or truncated files), or None if intact."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return "no readable meta.json: it was not finished"
    for name, size in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def _meta(path: Path, expect_model: dict | None, expect_data: dict | None = None) -> dict:
    meta = json.loads((path / "meta.json").read_text())
    if expect_data is not None and meta.get("data", expect_data) != expect_data:  # older checkpoints: no record
        made = ", ".join(f"data.{k}={v}" for k, v in meta["data"].items())
        raise UserError(f"checkpoint {path} was trained on other data ({made}); use another run_dir, or force=true "
                        f"to start over")
    if expect_model is not None and meta.get("model") != expect_model:
        made = meta.get("model", {})
        diff = sorted(k for k in {**made, **expect_model} if made.get(k) != expect_model.get(k))
        raise UserError(f"checkpoint {path} was made by another model config (differs in model.{', model.'.join(diff)}); "
                        f"use another run_dir, or force=true to start over")
    return meta


def load(path: Path, engine, expect_model: dict | None = None, parallel: str = "none",
         loss: tuple | None = None, expect_data: dict | None = None) -> dict:
    """Resume: weights, optimizer and scheduler in place, through the engine (collective); returns meta.json.
    loss=(module, optimizer, scheduler) also loads the loss's state saved with them.

    DCP checkpoints (parallel=none, ddp, fsdp2) load under any of those backends and world sizes;
    a DeepSpeed checkpoint under the parallel setting that wrote it, at any world size: another
    one than the writer's goes through DeepSpeed's universal checkpoint (engine.load_resharded)."""
    meta = _meta(path, expect_model, expect_data)
    if loss is not None and (_has_state(loss) or "loss" in meta) and meta.get("loss") != expect_loss(loss[0]):
        made = (meta.get("loss") or {}).get("class", "unrecorded")
        raise UserError(f"checkpoint {path} was made with another loss ({made}, or other loss settings); "
                        f"use another run_dir, or force=true to start over")
    written, fmt = meta.get("parallel", "none"), meta.get("format", "dcp")
    if fmt != engine.checkpoint_format or (fmt == "deepspeed" and written != parallel):
        dcp_backends = [name for name, b in TABLE.items() if b.checkpoint_format == "dcp"]
        fits = f"parallel={', '.join(dcp_backends[:-1])} or {dcp_backends[-1]}" if fmt == "dcp" else f"parallel={written}"
        raise UserError(f"checkpoint {path} was written with parallel={written}; resume with {fits}, "
                        f"or force=true to start over")
    written_by = meta.get("world_size", distributed.world_size())  # unrecorded before resharding: assumed the same
    same_world = written_by == distributed.world_size()
    if fmt == "deepspeed" and not same_world:
        engine.load_resharded(path, written_by)
    else:
        engine.load(path)
    if _has_state(loss):
        load_dcp(path / "loss", *loss)
    load_rng(path / "rng", same_world)
    return meta


def save_rng(folder: Path) -> None:
    """This rank's RNG states (the two-pass step and the losses seed theirs from (seed, step), so
    these matter only to code that draws from the global generators), as tensors and plain values:
    the file loads with torch.load(weights_only=True)."""
    folder.mkdir(parents=True, exist_ok=True)
    numpy_state = np.random.get_state(legacy=False)
    version, python_state, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                       "pos": numpy_state["state"]["pos"], "has_gauss": numpy_state["has_gauss"],
                       "gauss": numpy_state["gauss"]},
             "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64),
                        "gauss_next": gauss_next},
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(state, folder / f"rank_{distributed.rank()}.pt")


def load_rng(folder: Path, same_world: bool) -> None:
    """Restore this rank's RNG states; under another number of processes there is no state that is
    this rank's, so the generators keep their seeding."""
    file = folder / f"rank_{distributed.rank()}.pt"
    if not same_world or not file.is_file():
        log.info("RNG states not restored (%s)", "another number of processes" if not same_world else "none saved")
        return
    state = trust.torch_load(file, "RNG state")
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _has_state(loss: tuple | None) -> bool:
    return loss is not None and bool(loss[0].state_dict())


def expect_loss(loss_fn: nn.Module) -> dict:
    """What a checkpoint records of the loss: its class and the shapes of its saved state."""
    return {"class": type(loss_fn).__name__,
            "state": {k: list(v.shape) for k, v in loss_fn.state_dict().items()}}


def load_weights(path: Path, model: nn.Module, expect_model: dict | None = None,
                 expect_data: dict | None = None) -> dict:
    """The weights alone, into an unwrapped model in one process (export); any backend's checkpoint.
    A DeepSpeed checkpoint is consolidated from its ZeRO partitions with DeepSpeed's zero_to_fp32."""
    meta = _meta(path, expect_model, expect_data)
    if meta.get("format", "dcp") == "deepspeed":
        weights = read_weights(path)
        check_complete(model, weights)
        model.load_state_dict(weights, strict=not only_what_trains(model))
    else:
        load_dcp(path, model, no_dist=True)
    return meta


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A DeepSpeed checkpoint's whole fp32 weights, in this process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="zero")
    # ZeRO-1 keeps frozen weights only in its module state dict (a file of ZeRO-1/2 checkpoints),
    # which zero_to_fp32 does not read.
    module_file = path / "zero" / "mp_rank_00_model_states.pt"
    if module_file.is_file():  # DeepSpeed's own file, read as DeepSpeed reads it (see pipeline/trust.py)
        module = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
        state = {**{k: v for k, v in module.items() if k not in state}, **state}
    return state
