"""The reported checkpoint as the authors chose it: a recipe validates after each of its sampler's
epochs (Roth: every epoch), exports the best one, and the eval report shows it beside the last step,
labelled as selected on test; IBC's reload of the best weights at an lr drop."""
import json

import numpy as np
import pytest
from conftest import SMALL, run_pipeline

from pipeline.data.epoch_rules import build_sampler
from pipeline.data.shards import ShardIndex
from pipeline.tracking import read_metrics, series

ARGS = [*SMALL, "train.global_batch=64", "train.chunk_size=32", "train.epochs=3", "train.checkpoint_every=1000",
        "train.lr=0.001", "eval.diagnostics=false", "eval.show_queries=0"]


def test_roth_recipe_exports_the_best_epoch_and_reports_both(tmp_path):
    run_pipeline("stage=all", f"run_dir={tmp_path}", "recipe=roth", "data=digits", *ARGS)
    labels = ShardIndex.load(tmp_path / "shards" / "train").labels
    per_epoch = len(labels) // 64  # class_random_sampler.py:29
    steps, values = series(read_metrics(tmp_path / "logs" / "metrics.jsonl"), "val/recall@1")
    assert steps == [per_epoch, 2 * per_epoch, 3 * per_epoch]  # after every epoch (main.py:286)
    best = steps[int(np.argmax(values))]  # the first of equal values, as Best keeps it
    source = json.loads((tmp_path / "export" / "source.json").read_text())
    assert source["step"] == best and (tmp_path / "checkpoints" / "best").read_text() == f"step_{best}"
    meta = json.loads((tmp_path / "checkpoints" / f"step_{3 * per_epoch}" / "meta.json").read_text())
    assert meta["epochs"]["sampler"] == "roth" and meta["sampler"]["sampler"] == "roth"
    report = (tmp_path / "eval" / "report.md").read_text()
    assert f"(checkpoint `{(tmp_path / 'checkpoints' / f'step_{best}').resolve()}`, step {best})" in report
    assert f"step_{3 * per_epoch}` (step {3 * per_epoch})" in report  # the last checkpoint, evaluated too
    assert "the selected checkpoint's figures are optimistic" in report
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"frozen", "finetuned", "checkpoint"}


@pytest.mark.slow
def test_ibc_reloads_the_best_weights_at_the_lr_drop(tmp_path):
    """recipe=ibc's rule on a small run: validation every epoch, the best weights back at epoch 2's start."""
    args = ["recipe=ibc", "data=digits", *ARGS, "train.epochs=2", "train.milestones=[1]", "train.reload_best_at=[1]",
            "train.global_batch=32", "eval.models=[frozen,finetuned]"]
    proc = run_pipeline("stage=finetune", f"run_dir={tmp_path}", *args)
    labels = ShardIndex.load(tmp_path / "shards" / "train").labels
    _, clock = build_sampler("ibc", labels, 32, 4, 0)
    first = clock.epoch_start(1)
    assert f"step {first}: weights of the best checkpoint step_{first}" in proc.stderr
    steps, _ = series(read_metrics(tmp_path / "logs" / "metrics.jsonl"), "val/recall@1")
    assert steps == [first, clock.epoch_start(2)]
