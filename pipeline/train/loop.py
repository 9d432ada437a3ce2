"""The training loop: the loss (RS@k by default) over P x K batches with the two-pass step.

Every train.log_every steps the window's scalars (pipeline/train/step_metrics.py) go to the log, the
tracker (pipeline/tracking.py) and the progress bar; every train.val_every steps the model is
validated (pipeline/train/validation.py), and a new best value checkpoints that step and points
checkpoints/best at it. A run resumes from the newest intact checkpoint (pipeline/train/resume.py).
A stop request (pipeline/parallel/preemption.py) ends it after a step, with a checkpoint; a validation
due at that step runs when the run resumes. One that comes during a validation ends it after that validation.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from pipeline import tracking
from pipeline.config import Config
from pipeline.data.loader import train_loader
from pipeline.data.shards import ShardIndex
from pipeline.data.transforms import train_transform
from pipeline.parallel import checkpoint, distributed, preemption
from pipeline.parallel.engine import build_engine
from pipeline.parallel.precision import matmul_precision
from pipeline.parallel.shares import check_processes, check_shares
from pipeline.losses import build_loss, set_step
from pipeline.losses.protocol import wants_unnormalized
from pipeline.models import accounting
from pipeline.models.encoders import architecture, build_encoder
from pipeline.progress import StepProgress
from pipeline.run_context import RunContext
from pipeline.run_dir import RunDir
from pipeline.train.compile import compile_blocks
from pipeline.train.optim import build_optimizer, resolve_epochs, sampler_of
from pipeline.train.resume import restore_best, resume
from pipeline.train.selection import ReloadBest, on_epochs
from pipeline.train.step_metrics import StepMetrics
from pipeline.train.two_pass import two_pass_step
from pipeline.train.validation import Best, Validator

log = logging.getLogger(__name__)


def train(cfg: Config, ctx: RunContext, stop: preemption.StopRequest) -> None:
    """`cfg` as the runner resolved it: train.max_steps already decided by train.epochs where set."""
    t, world, device, rd = cfg.train, ctx.world, ctx.device, ctx.run
    check_processes(cfg.parallel.name, world.size)  # the runner checked both already; kept for direct callers
    check_shares(t, world.size)
    preemption.log_slurm_restart()
    index = ShardIndex.load(rd.shards / "train")
    sampler, clock = sampler_of(cfg, index.labels)
    resolved, epochs = resolve_epochs(t, len(index.labels), clock)  # the epoch facts for meta.json
    assert resolved.max_steps == t.max_steps, "train.epochs must be resolved by the runner (optim.with_steps)"
    log.info("train.sampler=%s: %s steps per epoch, %d steps", t.sampler, epochs["steps_per_epoch"], t.max_steps)
    validator = (Validator(cfg, ctx, on_epochs(clock, t.val_every_epochs, t.max_steps))  # checks the split first
                 if t.val_every or t.val_every_epochs else None)
    reload = ReloadBest(clock, t.reload_best_at, rd.checkpoints)
    model = build_encoder(cfg.model, cfg.seed).to(device).train()
    total, trains = accounting.parameters(model)  # what model.lora and model.trainable_blocks leave to train
    log.info("model: %s parameters, %s of them train (%.2f%%)", f"{total:,}", f"{trains:,}", 100 * trains / total)
    compile_blocks(model, t.compile)  # train.compile: torch.compile of each block, in place
    loss_fn = build_loss(cfg.loss, t, index.labels.tolist(), model.dim, cfg.seed).to(device)
    model.unnormalized_in_training = wants_unnormalized(loss_fn)
    loss_state = (loss_fn, *loss_optimizer(loss_fn, cfg, clock))
    engine = build_engine(model, lambda m: build_optimizer(m, t, clock), cfg.parallel,
                          t.chunk_size, device, t.grad_clip, t.precision)
    meta = {"model": architecture(cfg.model), "data": cfg.data.identity(), "parallel": cfg.parallel.name,
            "sampler": sampler.settings(),
            "epochs": epochs}
    start, saved = resume(cfg, rd, engine, loss_state, meta)
    best = restore_best(saved, t.best_metric, validator.evaluation.query if validator else None, rd)
    tracker = tracking.open_tracker(cfg, rd, start)
    progress = StepProgress(start, t.max_steps, world.rank)
    try:
        if validator and start and validator.due(start) and best.validated != start:  # stopped before validating
            validate_resumed(start, validator, engine, best, tracker, rd)
        batches = train_loader(index, train_transform(cfg.data, cfg.model), sampler, start, t.max_steps, world.rank,
                               world.size, workers=cfg.data.workers, worker_init_fn=preemption.leave_to_main_process,
                               device=device)
        monitor = StepMetrics(engine, t.global_batch, world.size, loss_state[2], *mfu_inputs(cfg, device))
        with progress.above():
            for step, (images, labels) in enumerate(monitor.timer.iterate(batches, "data"), start=start):
                with monitor.timer.phase("data"):
                    images, labels = images.to(device), labels.to(device)
                reload.before(step, engine, loss_fn, best)
                set_step(loss_fn, step)
                loss = two_pass_step(engine, images, labels, loss_fn, t.chunk_size, cfg.seed, step, monitor.timer)
                step_loss_parameters(*loss_state[1:])
                monitor.step_done(loss)
                done = step + 1
                if done % t.log_every == 0 or done == t.max_steps:
                    log_window(done, t.max_steps, monitor.take(), tracker, progress)
                progress.update()
                stopping = stop.requested() and done < t.max_steps  # collective: every rank asks every step
                improved = False
                if validator and validator.due(done) and not stopping:  # stopping: checkpoint first, validate on resume
                    with monitor.timer.phase("validation"):
                        improved = validate(done, validator, engine, best, tracker)
                    stopping = stop.requested() and done < t.max_steps  # one that came meanwhile: checkpoint now
                if stopping or improved or done % t.checkpoint_every == 0 or done == t.max_steps:
                    with monitor.timer.phase("checkpoint"):
                        checkpoint.save(rd.checkpoints, done, engine, {**meta, "validation": best.state()},
                                        t.keep_checkpoints, loss=loss_state, best=improved)
                if stopping:
                    preemption.preempted(stop, done, t.requeue)
    finally:
        progress.close()
        tracker.close()


def log_window(step: int, total: int, scalars: dict[str, float], tracker, progress: StepProgress) -> None:
    tracker.log(step, scalars)
    log.info("step %d/%d  loss %.4f  lr %.2e  grad norm %.3g  %.0f img/s", step, total, scalars["train/loss"],
             scalars["train/lr"], scalars["train/grad_norm"], scalars["train/images_per_s"])
    progress.note(scalars["train/loss"], scalars["train/images_per_s"])


def validate(step: int, validator: Validator, engine, best: Best, tracker) -> bool:
    """Validate at `step` (collective); log it; True if it is the best so far."""
    tic = time.perf_counter()
    scalars = validator.run(engine.model)
    tracker.log(step, {**scalars, "time/validation": time.perf_counter() - tic})
    improved = best.update(step, scalars)
    log.info("validation at step %d: %s%s", step, "  ".join(f"{k} {v:.4f}" for k, v in scalars.items()),
             "  (best so far)" if improved else "")
    return improved


def validate_resumed(step: int, validator: Validator, engine, best: Best, tracker, rd: RunDir) -> None:
    """The validation due at the step resumed from, which a stop request skipped: its checkpoint's
    meta.json (and `best`, if it is the best) record it afterwards."""
    improved = validate(step, validator, engine, best, tracker)

    def record() -> None:
        checkpoint.update_meta(rd.checkpoints / f"step_{step}", {"validation": best.state()})
        if improved:
            checkpoint.point_best(rd.checkpoints, best.checkpoint)
    distributed.on_main(record)


def mfu_inputs(cfg: Config, device) -> tuple[float, float]:
    """(model FLOPs per image, one device's peak FLOP/s) for perf/mfu: on a GPU, or wherever
    train.peak_tflops is set; (0, 0) otherwise."""
    peak = accounting.peak_flops(device, cfg.train.peak_tflops,
                                 matmul_precision(cfg.train.precision, cfg.train.tf32, device))
    return (accounting.flops_per_image(cfg.model, cfg.train.chunk_size), peak) if peak else (0.0, 0.0)


def loss_optimizer(loss_fn, cfg: Config, per_epoch: int = 1) -> tuple:
    """The loss's own parameters (proxies, beta, MPN) train with train.optimizer at loss.lr and
    loss.weight_decay under the model's schedule; every rank computes the same loss gradient, so no
    communication. (None, None) if none."""
    if not any(p.requires_grad for p in loss_fn.parameters()):
        return None, None
    decay = cfg.train.weight_decay if cfg.loss.weight_decay is None else cfg.loss.weight_decay
    own = dataclasses.replace(cfg.train, lr=cfg.loss.lr, head_lr=cfg.loss.lr, weight_decay=decay)
    return build_optimizer(loss_fn, own, per_epoch)


def step_loss_parameters(optimizer, scheduler) -> None:
    if optimizer is not None:
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
