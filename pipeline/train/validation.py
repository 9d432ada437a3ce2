"""Validation during training, and the best checkpoint it picks.

Every `train.val_every` steps and at the last step, the model in eval mode embeds the validation
split on every rank (each its share of the shards, as the eval stage embeds: pipeline.eval.inference),
and rank 0 scores it with the eval stage's metrics: `val/recall@k` for the dataset protocol's ks
and `val/map@r` (no clustering scores: k-means would cost more than the rest).

    train.val_split=val    shards/val: training classes held out at shard time (data.val_classes),
                           class-disjoint from train and test; leave-one-out
    train.val_split=test   the dataset's test protocol, as the eval stage runs it (its first
                           evaluation, for VehicleID test800): the papers' habit; the log says so
    train.val_split=auto   val where the shards have it, else test (the default)
    train.val_split=NAME   leave-one-out on any other split of the shards

`Best` follows `train.best_metric` (higher is better); its state travels in each checkpoint's
meta.json, so a resumed run keeps the best so far and knows which step it last validated.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from pipeline import protocols
from pipeline.config import Config
from pipeline.config.schema import val_metric_names as metric_names
from pipeline.data.transforms import eval_transform
from pipeline.parallel import distributed
from pipeline.errors import UserError
from pipeline.eval.inference import embed_split
from pipeline.eval.metrics import retrieval_metrics
from pipeline.protocols import Evaluation, Protocol
from pipeline.run_context import RunContext

log = logging.getLogger(__name__)

VAL_SPLIT = "val"
MIN_CLASSES = 5  # a validation split with fewer classes ranks checkpoints poorly (recall@1 saturates)


def evaluation(cfg: Config, available: list[str], proto: Protocol) -> Evaluation:
    """The query (and gallery) split that validation embeds, from train.val_split; says in the log
    when it is the test split."""
    choice = cfg.train.val_split
    if choice == "auto":
        choice = VAL_SPLIT if VAL_SPLIT in available else "test"
    if choice == "test":
        protocols.check_splits(proto, available, "the shards")
        chosen = proto.evaluations[0]
        log.warning("validation runs on the test split (%s): the best checkpoint is chosen on the classes the eval "
                    "stage reports, as the papers' code does%s", chosen.query if chosen.gallery is None
                    else f"{chosen.query} -> {chosen.gallery}",
                    "" if cfg.train.val_split == "test" else
                    f" (train.val_split=auto and data.val_classes={cfg.data.val_classes:g} held no classes out)")
        return chosen
    if choice not in available:
        hint = (" (set data.val_classes, e.g. 0.1, to hold training classes out as shards/val)"
                if choice == VAL_SPLIT else "")
        raise UserError(f"train.val_split={choice} but the shards have no such split (splits: {', '.join(available)})"
                        f"{hint}; or set train.val_split=test, or train.val_every=0")
    return Evaluation(choice, choice)


class Validator:
    """`due(step)`: every train.val_every steps and at the last, or the given rule (the recipes' epochs:
    pipeline/train/selection.py)."""

    def __init__(self, cfg: Config, ctx: RunContext, due: Callable[[int], bool] | None = None):
        splits = ctx.splits
        self.evaluation = evaluation(cfg, list(splits), ctx.protocol)
        self.ks = ctx.protocol.ks
        self.every, self.last, self.rule = cfg.train.val_every, cfg.train.max_steps, due
        self.shards, self.device, self.precision = ctx.run.shards, ctx.device, cfg.train.precision
        self.transform, self.batch_size, self.workers = eval_transform(cfg.model, cfg.data.eval_resize), cfg.eval.batch_size, cfg.data.workers
        self.hint = _too_small_hint(cfg)
        self.classes = splits[self.evaluation.query]["classes"]
        self.saturated = False
        if self.classes < MIN_CLASSES:
            log.warning("validation on %s has %d classes (fewer than %d): it ranks checkpoints poorly and `best` may "
                        "be an early step; %s", self.evaluation.query, self.classes, MIN_CLASSES, self.hint)

    def due(self, step: int) -> bool:
        if self.rule is not None:
            return self.rule(step)
        return self.every > 0 and (step % self.every == 0 or step == self.last)

    def run(self, model) -> dict[str, float]:
        """val/recall@k and val/map@r of `model` (the engine's, in train mode; left in train mode), on
        every rank (collective: every rank embeds its share)."""
        e = self.evaluation
        data = {split: embed_split(model, self.shards / split, self.transform, self.batch_size, self.device,
                                   desc=f"validate on {split}", workers=self.workers, precision=self.precision)
                for split in dict.fromkeys(s for s in (e.query, e.gallery) if s)}
        model.train()

        def score() -> dict[str, float]:
            q = data[e.query]
            gallery = (data[e.gallery]["embeddings"], data[e.gallery]["labels"]) if e.gallery else (None, None)
            m = retrieval_metrics(q["embeddings"], q["labels"], *gallery, ks=self.ks, nmi=False)
            self.warn_saturated(m[f"recall@{self.ks[0]}"])
            return {name: m[name[len("val/"):]] for name in metric_names(self.ks)}
        return distributed.on_main(score)

    def warn_saturated(self, recall: float) -> None:
        """Once per run: a recall@1 of 1.0 cannot tell later checkpoints from this one."""
        if recall >= 1.0 and not self.saturated:
            self.saturated = True
            log.warning("val/recall@%d is 1.0 on %s (%d classes): validation can no longer tell checkpoints apart and "
                        "`best` stays at the first step that reached it; %s", self.ks[0], self.evaluation.query,
                        self.classes, self.hint)


def _too_small_hint(cfg: Config) -> str:
    """How to get a validation split that ranks: more held-out classes (a new shard), or the test split."""
    if cfg.train.val_split in ("auto", VAL_SPLIT):
        return (f"hold out more training classes (data.val_classes={cfg.data.val_classes:g} now; a count such as "
                f"data.val_classes={MIN_CLASSES} in a new run_dir or with stage=shard force=true), or set "
                f"train.val_split=test, or train.best_metric=val/map@r")
    return "choose a larger split with train.val_split, or set train.best_metric=val/map@r"


@dataclass
class Best:
    """The best value of `metric` so far on `split`, the step that had it, and the last step validated."""
    metric: str
    split: str | None = None
    value: float | None = None
    step: int | None = None
    validated: int | None = None

    @property
    def checkpoint(self) -> str | None:
        return None if self.step is None else f"step_{self.step}"

    def update(self, step: int, scalars: dict[str, float]) -> bool:
        """Record a validation at `step`; True if it is a new best."""
        self.validated = step
        value = scalars[self.metric]
        if np.isnan(value) or (self.value is not None and value <= self.value):
            return False
        self.value, self.step = float(value), step
        return True

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def restore(cls, saved: dict | None, metric: str, split: str | None) -> "Best":
        """From a checkpoint's meta.json; a best by another metric or on another split is not kept."""
        if not saved:
            return cls(metric, split)
        if (saved["metric"], saved["split"]) != (metric, split):
            log.warning("the validation changed (%s on %s -> %s on %s): the best checkpoint is chosen afresh",
                        saved["metric"], saved["split"], metric, split)
            return cls(metric, split, validated=saved.get("validated"))
        return cls(**saved)
