"""finetune: the loss (RS@k by default) over P x K batches with the two-pass step; checkpoints every train.checkpoint_every steps.

Running it again resumes from the newest intact checkpoint. SIGUSR1, SIGTERM or $PIPELINE_STOP_FILE
stop it after a step, with a checkpoint and, under Slurm, a requeue (pipeline/preemption.py).
"""
from __future__ import annotations

import dataclasses
import logging
import time

from pipeline import checkpoint, distributed, preemption
from pipeline.config import Config, TrainConfig
from pipeline.data.loader import train_loader
from pipeline.data.sampler import PKSampler
from pipeline.data.shards import ShardIndex
from pipeline.data.transforms import train_transform
from pipeline.distributed import pick_device, world_from_env
from pipeline.errors import UserError
from pipeline.encoders import architecture, build_encoder
from pipeline.engine import build_engine
from pipeline.losses import build_loss, set_step
from pipeline.optim import build_optimizer, resolve_epochs
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
    if world.size > 1 and cfg.parallel.name == "none":
        raise UserError(f"{world.size} processes were launched but parallel=none trains in one; launch a single process")
    check_shares(t, world.size)
    preemption.log_slurm_restart()
    device = pick_device(cfg.device, world)
    index = ShardIndex.load(rd.shards / "train")
    t, epochs = resolve_epochs(t, len(index.labels))  # train.epochs -> max_steps
    cfg = dataclasses.replace(cfg, train=t)
    model = build_encoder(cfg.model, cfg.seed).to(device).train()
    loss_fn = build_loss(cfg.loss, t, index.labels.tolist(), model.dim, cfg.seed).to(device)
    model.unnormalized_in_training = getattr(loss_fn, "unnormalized_inputs", False)
    loss_state = (loss_fn, *loss_optimizer(loss_fn, cfg, epochs["steps_per_epoch"]))
    engine = build_engine(model, lambda m: build_optimizer(m, t, epochs["steps_per_epoch"]), cfg.parallel,
                          t.chunk_size, device)
    sampler = PKSampler(index.labels, t.global_batch, t.samples_per_class, cfg.seed, t.small_classes)
    meta = {"model": architecture(cfg.model), "parallel": cfg.parallel.name, "sampler": sampler.settings(),
            "epochs": epochs}
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


def check_shares(t: TrainConfig, processes: int) -> None:
    """Each rank takes an equal, contiguous share of the global batch, cut into whole chunks, so that
    the chunks (and their drop-path masks) are those of a single process: the weights do not
    depend on the number of processes."""
    share = t.global_batch // processes
    if processes > 1 and (t.global_batch % processes or share % t.chunk_size):
        raise UserError(f"train.global_batch={t.global_batch} over {processes} processes must give each a multiple of "
                        f"train.chunk_size={t.chunk_size}; pick a global batch divisible by {processes * t.chunk_size}")


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
