"""The checkpoint a recipe reports, chosen as the authors chose it.

    train.val_every_epochs=N   validate after epochs 1, 1 + N, 1 + 2N, ... of the sampler's epochs
                               (pipeline/data/epoch_rules.py) and at the last step, instead of every
                               train.val_every steps: RS@k every 5 epochs (src/main.py:288-293
                               `epoch % 5 == 0 or epoch == n_epochs - 1`, epochs from 0; the best kept,
                               src/evaluate.py:117-118), Roth every epoch (main.py:286), IBC every epoch
                               (trainer.py:145-193)
    train.reload_best_at=[E..] at the start of epoch E the best checkpoint's weights (the model's and the
                               loss's, not the optimizer's) are loaded back: IBC at each lr drop
                               (trainer.py:151-168, epochs 31 and 51 counted from 1)

With export.checkpoint=best the exported model is the best validation's; the recipes validate on
the test split as the papers did, so that figure is optimistic, and the eval report says so beside
the last checkpoint's.
"""
from __future__ import annotations

import logging
from typing import Callable

from pipeline.parallel import checkpoint

log = logging.getLogger(__name__)


def on_epochs(clock, every_epochs: int, last: int) -> Callable[[int], bool] | None:
    """The validator's rule: due after epochs 1, 1 + every_epochs, ... and at the last step (None: off)."""
    if every_epochs <= 0:
        return None

    def due(step: int) -> bool:
        epoch = clock.epoch_of(step)
        return step == last or (step == clock.epoch_start(epoch) and epoch > 0 and (epoch - 1) % every_epochs == 0)
    return due


class ReloadBest:
    """Loads the best checkpoint's weights back before the first step of each epoch in `epochs`."""

    def __init__(self, clock, epochs: list[float], folder):
        self.steps = {clock.step_of(e) for e in epochs if e > 0}
        self.folder = folder

    def before(self, step: int, engine, loss_fn, best) -> None:
        """Collective: every rank loads its part, through the engine (any backend)."""
        if step not in self.steps or best.checkpoint is None:
            return
        path = self.folder / best.checkpoint
        engine.load_weights(path)
        if loss_fn.state_dict() and (path / "loss").is_dir():  # replicated on every rank, saved through DCP
            checkpoint.load_dcp(path / "loss", loss_fn)
        log.info("step %d: weights of the best checkpoint %s (%s %.4f) loaded back", step, best.checkpoint,
                 best.metric, best.value)
