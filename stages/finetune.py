"""finetune: the loss (RS@k by default) over P x K batches with the two-pass step; checkpoints every train.checkpoint_every steps.

Running it again resumes from the newest intact checkpoint. SIGUSR1, SIGTERM or $PIPELINE_STOP_FILE
stop it after a step, with a checkpoint and, under Slurm, a requeue (pipeline/preemption.py).
"""
from __future__ import annotations

import dataclasses
import logging
import time

from pipeline import checkpoint, distributed, preemption
from pipeline.config import Config
from pipeline.data.loader import train_loader
from pipeline.data.sampler import PKSampler
from pipeline.data.shards import ShardIndex
from pipeline.data.transforms import train_transform
from pipeline.distributed import pick_device, world_from_env
from pipeline.encoders import architecture, build_encoder
from pipeline.engine import build_engine
from pipeline.losses import build_loss, set_step
from pipeline.optim import build_optimizer
from pipeline.preflight import check_processes, check_shares
from pipeline.run_dir import RunDir, fresh_dir
from pipeline.two_pass import two_pass_step

log = logging.getLogger(__name__)


DISTRIBUTED = True  # every rank trains (the runner starts it on all of them)


def run(cfg: Config, rd: RunDir) -> None:
    with preemption.StopRequest() as stop:
        train(cfg, rd, stop)


def train(cfg: Config, rd: RunDir, stop: preemption.StopRequest) -> None:
    t = cfg.train
    world = world_from_env()
    check_processes(cfg.parallel.name, world.size)  # the runner checked both already; kept for direct callers
    check_shares(t, world.size)
    preemption.log_slurm_restart()
    device = pick_device(cfg.device, world)
    model = build_encoder(cfg.model, cfg.seed).to(device).train()
    index = ShardIndex.load(rd.shards / "train")
    loss_fn = build_loss(cfg.loss, t, index.labels.tolist(), model.dim, cfg.seed).to(device)
    loss_state = (loss_fn, *loss_optimizer(loss_fn, cfg))
    engine = build_engine(model, lambda m: build_optimizer(m, t), cfg.parallel, t.chunk_size, device)
    sampler = PKSampler(index.labels, t.global_batch, t.samples_per_class, cfg.seed)
    meta = {"model": architecture(cfg.model), "parallel": cfg.parallel.name, "sampler": sampler.settings()}
    start = resume(cfg, rd, engine, loss_state, meta)

    batches = train_loader(index, train_transform(cfg.data, cfg.model), sampler, start, t.max_steps, world.rank,
                           world.size, workers=cfg.data.workers, worker_init_fn=preemption.leave_to_main_process)
    tic = time.perf_counter()
    for step, (images, labels) in enumerate(batches, start=start):
        set_step(loss_fn, step)
        loss = two_pass_step(engine, images.to(device), labels.to(device), loss_fn, t.chunk_size, cfg.seed, step)
        step_loss_parameters(*loss_state[1:])
        done = step + 1
        if done % t.log_every == 0 or done == t.max_steps:
            rate = (done - start) * t.global_batch / (time.perf_counter() - tic)
            log.info("step %d/%d  loss %.4f  lr %.2e  %.0f img/s", done, t.max_steps, loss.item(),
                     engine.scheduler.get_last_lr()[0], rate)
        stopping = stop.requested() and done < t.max_steps  # collective: every rank asks every step
        if stopping or done % t.checkpoint_every == 0 or done == t.max_steps:
            checkpoint.save(rd.checkpoints, done, engine, meta, t.keep_checkpoints, loss=loss_state)
        if stopping:
            preempted(stop, done, t.requeue)


def resume(cfg: Config, rd: RunDir, engine, loss_state: tuple, meta: dict) -> int:
    """The step to start from: 0, or that of the newest intact checkpoint (loaded into the engine)."""
    if cfg.force:
        distributed.on_main(lambda: fresh_dir(rd.checkpoints))
        return 0
    last = distributed.on_main(lambda: checkpoint.latest(rd.checkpoints))  # rank 0 checks, all load the same
    if last is None:
        return 0
    saved = checkpoint.load(last, engine, expect_model=meta["model"], parallel=cfg.parallel.name, loss=loss_state)
    log.info("resuming from %s", last)
    if saved.get("sampler", meta["sampler"]) != meta["sampler"]:
        log.warning("the sampler settings changed since %s (%s -> %s): the batches from step %d on differ from "
                    "the first run's", last.name, saved["sampler"], meta["sampler"], saved["step"])
    if saved["step"] >= cfg.train.max_steps:
        log.info("the checkpoint is at step %d >= train.max_steps=%d: nothing to train", saved["step"],
                 cfg.train.max_steps)
    return saved["step"]


def preempted(stop: preemption.StopRequest, step: int, requeue: bool) -> None:
    """After the checkpoint of `step`: requeue the Slurm job if asked, and stop this run."""
    log.warning("preempted after step %d (%s): checkpoint saved", step, stop.reason or "another rank was signalled")
    distributed.on_main(stop.clear_stop_file)
    requeued = distributed.broadcast_object(requeue and preemption.requeue())  # rank 0 requeues; all say so
    raise preemption.Preempted(f"preempted after step {step}; "
                               + ("the Slurm job was requeued" if requeued else "run the same command to resume"))


def loss_optimizer(loss_fn, cfg: Config) -> tuple:
    """The loss's own parameters (proxies, beta, MPN) train with AdamW at loss.lr under the model's
    schedule; every rank computes the same loss gradient, so no communication. (None, None) if none."""
    if not any(p.requires_grad for p in loss_fn.parameters()):
        return None, None
    return build_optimizer(loss_fn, dataclasses.replace(cfg.train, lr=cfg.loss.lr, head_lr=cfg.loss.lr))


def step_loss_parameters(optimizer, scheduler) -> None:
    if optimizer is not None:
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
