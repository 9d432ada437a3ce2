"""The runner: resolve the config, run the requested stage after any missing prerequisites.

A stage is skipped while its completion marker matches the settings it depends on and the runs of
the stages before it; `force=true` reruns the requested stage(s).
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import sys
import uuid

from omegaconf import OmegaConf

from pipeline import distributed, preflight, trust
from pipeline import log as logs
from pipeline.config import Config, load_config, to_yaml
from pipeline.distributed import pick_device, world_from_env
from pipeline.errors import UserError
from pipeline.preemption import EXIT_STATUS, Preempted
from pipeline.run_dir import RunDir

log = logging.getLogger("pipeline")

ALL = ("shard", "embed", "finetune", "export", "eval")  # what stage=all runs
ORDER = ALL + ("index", "search", "serve")
REQUIRES = {"shard": (), "embed": ("shard",), "finetune": ("shard",), "export": ("finetune",), "eval": ("embed", "export"),
            "index": ("export",), "search": ("index",), "serve": ("index",)}
ALWAYS_RUN = ("search", "serve")  # they answer queries: never "complete"

# The settings each stage's output depends on (dotted prefixes), and those that never change it.
# data.seed (the seed unless set) alone seeds the shards; the model's random init and training use seed.
_SHARD = ("data.seed", "data.name", "data.root", "data.image_size", "data.image_format", "data.test_fraction",
          "data.shard_max_count", "data.shard_max_size", "data.val_classes", "data.font_dirs",
          "data.min_fonts", "data.max_fonts")
_TRAIN = _SHARD + ("seed", "model", "train", "loss", "data.crop_scale", "data.hflip", "data.random_erasing")
INPUTS = {"shard": _SHARD, "embed": _SHARD + ("seed", "model", "eval.batch_size", "data.eval_resize"), "finetune": _TRAIN,
          "export": _TRAIN + ("export",), "eval": _TRAIN + ("export", "eval", "data.eval_resize"),
          "index": _TRAIN + ("export", "index", "data.eval_resize"), "search": ("search",), "serve": ("serve",)}
# Validation and tracking settings change what a run reports and which checkpoint is `best`, not the
# weights it trains: changing them reruns nothing (a finished finetune would resume to do nothing).
IGNORED = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.requeue",
           "model.grad_checkpointing", "train.trust_checkpoint", "train.val_every", "train.val_split",
           "train.best_metric", "train.peak_tflops", "track", "index.gpu")


def requires(stage: str, cfg: Config) -> tuple[str, ...]:
    """The stages `stage` needs; eval and index need only those that make the models they use."""
    if stage == "index" and cfg.index.checkpoint is not None:
        own = cfg.index.checkpoint in ("latest", "best") or cfg.index.checkpoint.startswith("step_")
        return ("finetune",) if own else ("shard",)
    if stage != "eval":
        return REQUIRES[stage]
    models, e = cfg.eval.models, cfg.eval
    need = {"embed": "frozen" in models, "export": "finetuned" in models and e.export is None,
            "finetune": "checkpoint" in models and (e.checkpoint in ("latest", "best") or e.checkpoint.startswith("step_"))}
    return tuple(s for s in ORDER if need.get(s)) or ("shard",)


def _stage_module(name: str):
    from stages import embed, evaluate, export, finetune, index, search, serve, shard
    return {"shard": shard, "embed": embed, "finetune": finetune, "export": export, "eval": evaluate,
            "index": index, "search": search, "serve": serve}[name]


def run_stage(stage: str, cfg: Config, rd: RunDir) -> None:
    """Under several processes, a stage module with DISTRIBUTED = True runs on every rank;
    any other runs on rank 0 while the others wait."""
    module = _stage_module(stage)
    if getattr(module, "DISTRIBUTED", False):
        module.run(cfg, rd)
        distributed.barrier()
    else:
        distributed.on_main(lambda: module.run(cfg, rd))


def _flatten(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


def fingerprint(cfg: Config, rd: RunDir, stage: str) -> dict:
    flat = dict(_flatten(OmegaConf.to_container(OmegaConf.structured(cfg))))
    settings = {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in INPUTS[stage])
                and not any(k == p or k.startswith(p + ".") for p in IGNORED)}
    return {"settings": settings, "after": {req: rd.run_id(req) for req in requires(stage, cfg)}}


def planned(cfg: Config, rd: RunDir) -> list[str]:
    """The stages this command will run: those not complete (or forced), and every stage after one
    that runs (its inputs change). What the preflight checks for."""
    requested = ALL if cfg.stage == "all" else (cfg.stage,)
    runs: dict[str, bool] = {}

    def will_run(stage: str) -> bool:
        if stage not in runs:
            before = [will_run(req) for req in requires(stage, cfg)]
            runs[stage] = (any(before) or (cfg.force and stage in requested) or stage in ALWAYS_RUN
                           or not rd.is_complete(stage, fingerprint(cfg, rd, stage)))
        return runs[stage]

    for stage in requested:
        will_run(stage)
    return [s for s in ORDER if runs.get(s)]


def preflight_passes(cfg: Config, rd: RunDir, processes: int) -> bool:
    """Rank 0 runs the cheap checks of pipeline/preflight.py and prints every problem, one line each."""
    found = distributed.on_main(lambda: preflight.problems(cfg, rd, processes, planned(cfg, rd)))
    if distributed.rank() == 0:
        for problem in found:
            print(f"error: {problem}", file=sys.stderr)
    return not found


def run_stages(cfg: Config, rd: RunDir) -> None:
    requested = ALL if cfg.stage == "all" else (cfg.stage,)
    done: set[str] = set()

    def ensure(stage: str) -> None:
        if stage in done:
            return
        for req in requires(stage, cfg):
            ensure(req)
        forced = cfg.force and stage in requested
        fp = fingerprint(cfg, rd, stage)
        if distributed.broadcast_object(rd.is_complete(stage, fp) and not forced and stage not in ALWAYS_RUN):
            log.info("[%s] complete, skipped (force=true reruns it)", stage)
        else:
            log.info("[%s] running", stage)
            distributed.on_main(lambda: rd.clear_marker(stage))
            run_stage(stage, dataclasses.replace(cfg, force=forced), rd)
            distributed.on_main(lambda: rd.mark_complete(stage, fp, run_id=uuid.uuid4().hex))
            log.info("[%s] done", stage)
        done.add(stage)

    for stage in requested:
        ensure(stage)


def main(argv: list[str] | None = None) -> int:
    broken = False  # a collective failed: the process group cannot be left together
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        trust.allow_pickle(cfg.train.trust_checkpoint)
        world = world_from_env()
        rd = RunDir(cfg.run_dir)
        distributed.init(world, pick_device(cfg.device, world), cfg.parallel.timeout)
        if not preflight_passes(cfg, rd, world.size):
            return 2  # nothing written
        rd.root.mkdir(parents=True, exist_ok=True)
        logs.setup(rd.logs, world.rank)
        log.info("rank %d of %d on %s", world.rank, world.size, socket.gethostname())
        if world.is_main:
            (rd.root / "config.yaml").write_text(to_yaml(cfg))
        run_stages(cfg, rd)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return EXIT_STATUS
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        failure = distributed.communication_failure(e)
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        broken = True
        return 1
    finally:
        distributed.shutdown(together=not broken)
    return 0
