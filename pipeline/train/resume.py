"""Resuming a run: the newest intact checkpoint, and the best checkpoint recorded in it."""
from __future__ import annotations

import logging

from pipeline.config import Config
from pipeline.parallel import checkpoint, distributed
from pipeline.run_dir import RunDir, fresh_dir
from pipeline.train.validation import Best

log = logging.getLogger(__name__)


def resume(cfg: Config, rd: RunDir, engine, loss_state: tuple, meta: dict) -> tuple[int, dict]:
    """The step to start from and the meta.json of its checkpoint: (0, {}), or those of the newest
    intact checkpoint (loaded into the engine)."""
    if cfg.force:
        distributed.on_main(lambda: fresh_dir(rd.checkpoints))
        return 0, {}
    distributed.on_main(lambda: checkpoint.remove_partial(rd.checkpoints))
    last = distributed.on_main(lambda: checkpoint.latest(rd.checkpoints))  # rank 0 checks, all load the same
    if last is None:
        return 0, {}
    saved = checkpoint.load(last, engine, expect_model=meta["model"], parallel=cfg.parallel.name, loss=loss_state,
                            expect_data=meta["data"])
    log.info("resuming from %s", last)
    if saved.get("sampler", meta["sampler"]) != meta["sampler"]:
        log.warning("the sampler settings changed since %s (%s -> %s): the batches from step %d on differ from "
                    "the first run's", last.name, saved["sampler"], meta["sampler"], saved["step"])
    if saved["step"] >= cfg.train.max_steps:
        log.info("the checkpoint is at step %d >= train.max_steps=%d: nothing to train", saved["step"],
                 cfg.train.max_steps)
    return saved["step"], saved


def restore_best(saved: dict, metric: str, split: str | None, rd: RunDir) -> Best:
    """The best so far, from the checkpoint resumed from; `best` is pointed again at its checkpoint
    (a fallback to an older checkpoint may have left it naming a later one)."""
    best = Best.restore(saved.get("validation"), metric, split)

    def repoint() -> None:
        name = best.checkpoint if best.checkpoint and (rd.checkpoints / best.checkpoint).is_dir() else None
        checkpoint.point_best(rd.checkpoints, name)
    distributed.on_main(repoint)
    return best
