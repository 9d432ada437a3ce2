"""The runner: resolve the config, run the requested stage after any missing prerequisites.

What every stage needs from the environment and the run directory (world, device, the run's shards
and protocol) is resolved here once, as a RunContext (pipeline/run_context.py), and handed to each
stage; train.epochs becomes train.max_steps here too, once the training shards exist, before any
stage is fingerprinted (pipeline/train/optim.py: with_steps).

A stage is skipped while its completion marker matches the settings it depends on and the runs of
the stages before it; `force=true` reruns the requested stage(s).
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import sys
import uuid

from pipeline import disk, preflight, run_lock, trust
from pipeline import log as logs
from pipeline.config import Config
from pipeline.config.experiment import check_unchanged, describe, finished_stages, ignored_settings, run_dir_of
from pipeline.config.experiment import check_run_exists
from pipeline.config.inputs import stage_settings
from pipeline.config.loader import resolve
from pipeline.config.loader import save as save_config
from pipeline.errors import UserError
from pipeline.parallel import distributed, precision
from pipeline.parallel.checkpoint_names import names_run_checkpoint
from pipeline.parallel.distributed import world_from_env
from pipeline.parallel.preemption import EXIT_STATUS, Preempted
from pipeline.run_context import RunContext
from pipeline.run_dir import RunDir
from pipeline.train.optim import with_steps

log = logging.getLogger("pipeline")

ALL = ("shard", "embed", "finetune", "export", "eval")  # what stage=all runs
ORDER = ALL + ("index", "search", "serve")
REQUIRES = {"shard": (), "embed": ("shard",), "finetune": ("shard",), "export": ("finetune",), "eval": ("embed", "export"),
            "index": ("export",), "search": ("index",), "serve": ("index",)}
ALWAYS_RUN = ("search", "serve")  # they answer queries: never "complete"


def requires(stage: str, cfg: Config) -> tuple[str, ...]:
    """The stages `stage` needs; eval and index need only those that make the models they use."""
    if stage == "index" and cfg.index.checkpoint is not None:
        return ("finetune",) if names_run_checkpoint(cfg.index.checkpoint) else ("shard",)
    if stage != "eval":
        return REQUIRES[stage]
    models, e = cfg.eval.models, cfg.eval
    need = {"embed": "frozen" in models, "export": "finetuned" in models and e.export is None,
            "finetune": "checkpoint" in models and names_run_checkpoint(e.checkpoint)}
    return tuple(s for s in ORDER if need.get(s)) or ("shard",)


def _stage_module(name: str):
    from pipeline.stages import embed, evaluate, export, finetune, index, search, serve, shard
    return {"shard": shard, "embed": embed, "finetune": finetune, "export": export, "eval": evaluate,
            "index": index, "search": search, "serve": serve}[name]


def run_stage(stage: str, cfg: Config, ctx: RunContext) -> None:
    """Under several processes, a stage module with DISTRIBUTED = True runs on every rank;
    any other runs on rank 0 while the others wait."""
    module, rd = _stage_module(stage), ctx.run
    with disk.writing(f"the {stage} stage's output", rd.root, partial=lambda: partial_outputs(rd)):
        if getattr(module, "DISTRIBUTED", False):
            module.run(cfg, ctx)
            distributed.barrier()
        else:
            distributed.on_main(lambda: module.run(cfg, ctx))


def partial_outputs(rd: RunDir) -> list:
    """The .tmp files and folders the stages write before renaming them into place."""
    return [*rd.root.glob("*.tmp"), *rd.root.glob("embeddings/**/*.tmp.npz"), *rd.checkpoints.glob("*.tmp")]


def fingerprint(cfg: Config, rd: RunDir, stage: str) -> dict:
    """The values of the settings `stage` depends on (pipeline/config/inputs.py) and the runs it follows."""
    return {"settings": stage_settings(cfg, stage), "after": {req: rd.run_id(req) for req in requires(stage, cfg)}}


def planned(cfg: Config, rd: RunDir) -> list[str]:
    """The stages this command will run: those not complete (or forced), and every stage after one
    that runs (its inputs change). What the preflight checks for. Fingerprinted as run_stages does,
    train.epochs resolved to max_steps once the shards exist."""
    cfg = with_steps(cfg, rd.shards)
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


def run_stages(cfg: Config, ctx: RunContext) -> None:
    requested = ALL if cfg.stage == "all" else (cfg.stage,)
    done: set[str] = set()
    rd = ctx.run
    cfg = with_steps(cfg, rd.shards)

    def ensure(stage: str) -> None:
        nonlocal cfg
        if stage in done:
            return
        for req in requires(stage, cfg):
            ensure(req)
        forced = cfg.force and stage in requested
        fp = fingerprint(cfg, rd, stage)
        if distributed.broadcast_object(rd.is_complete(stage, fp) and not forced and stage not in ALWAYS_RUN):
            log.info("[%s] complete, skipped (%s reruns it)", stage, f"stage={stage} force=true" if cfg.force else "force=true")
        else:
            log.info("[%s] running", stage)
            distributed.on_main(lambda: rd.clear_marker(stage))
            run_stage(stage, dataclasses.replace(cfg, force=forced), ctx)
            distributed.on_main(lambda: rd.mark_complete(stage, fp, run_id=uuid.uuid4().hex))
            log.info("[%s] done", stage)
        done.add(stage)
        if stage == "shard":  # the training split's size is known now
            cfg = with_steps(cfg, rd.shards)

    for stage in requested:
        ensure(stage)


def show_config(resolved, rd: RunDir, processes: int) -> int:
    """stage=config: every setting with its source, then the checks' verdict; runs and writes nothing."""
    print(describe(steps_shown(resolved, rd)))
    cfg = dataclasses.replace(resolved.config, stage="all")
    try:
        check_unchanged(resolved, rd.root, finished_stages(rd.root))
        found = preflight.problems(cfg, rd, processes, planned(cfg, rd))
    except UserError as e:
        found = [str(e)]
    for problem in found:
        print(f"error: {problem}", file=sys.stderr)
    print(f"# checks: {'passed' if not found else f'{len(found)} problem(s)'}; stage=config ran nothing")
    return 2 if found else 0


def steps_shown(resolved, rd: RunDir):
    """The settings as the stages will see them: train.max_steps decided by train.epochs where the
    training shards already exist."""
    stepped = with_steps(resolved.config, rd.shards)
    if stepped.train.max_steps == resolved.config.train.max_steps:
        return resolved
    return dataclasses.replace(resolved, config=stepped, sources={
        **resolved.sources, "train.max_steps": f"train.epochs={stepped.train.epochs} over {rd.shards / 'train'}"})


def take_lock(cfg: Config, rd: RunDir) -> run_lock.RunLock | None:
    """Rank 0 takes run_dir/.lock for a command that writes the run directory; every rank raises
    the same UserError if it cannot be had (another writer, or a filesystem without flock)."""
    held, problem = None, None
    if distributed.rank() == 0 and cfg.lock and run_lock.needs_lock(cfg.stage):
        try:
            held = run_lock.acquire(rd.root)
        except UserError as e:
            problem = str(e)
    problem = distributed.broadcast_object(problem)
    if problem is not None:
        raise UserError(problem)
    return held


def main(argv: list[str] | None = None) -> int:
    broken = False  # a collective failed: the process group cannot be left together
    lock = None
    try:
        args = sys.argv[1:] if argv is None else argv
        resolved = resolve(args, run_dir=run_dir_of(args))
        cfg = resolved.config
        if cfg.stage == "plan":  # alone, in this process, on fake tensors: no process group, no other stage
            from pipeline.stages import plan
            return plan.run(cfg)
        trust.allow_pickle(cfg.train.trust_checkpoint)
        world = world_from_env()
        rd = RunDir(cfg.run_dir)
        if cfg.stage == "config":
            return show_config(resolved, rd, world.size)
        check_run_exists(cfg)
        check_unchanged(resolved, rd.root, finished_stages(rd.root))
        ctx = RunContext.resolve(cfg, world)
        distributed.init(world, ctx.device, cfg.parallel.timeout)
        precision.set_tf32(cfg.train.precision, cfg.train.tf32, ctx.device)  # before any model: fp32 runs' matmuls
        existing = distributed.broadcast_object(rd.root.is_dir())
        if existing:  # a run directory in use: said at once, before the checks
            lock = take_lock(cfg, rd)
        if not preflight.passes(cfg, rd, world.size, lambda: planned(cfg, rd)):
            return 2  # nothing written
        if not existing:  # a new one is made only once the checks pass
            lock = take_lock(cfg, rd)
        rd.root.mkdir(parents=True, exist_ok=True)
        logs.setup(rd.logs, world.rank)
        log.info("rank %d of %d on %s (%d torch threads)", world.rank, world.size, socket.gethostname(),
                 distributed.cpu_threads())
        for note in resolved.notes + ignored_settings(resolved) + distributed.launcher_mismatch(world):
            log.warning(note)
        if world.is_main:
            with disk.writing("the config", rd.root):
                save_config(resolved, rd.root)
        run_stages(cfg, ctx)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        if distributed.rank() == 0:  # every rank stops at the same step, with the same line
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
        if lock is not None:
            lock.release()
    return 0
