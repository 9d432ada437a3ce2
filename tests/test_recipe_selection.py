"""The reported checkpoint as the authors chose it: a recipe validates after each of its sampler's
epochs (Roth: every epoch), exports the best one, and the eval report shows it beside the last step,
labelled as selected on test; IBC's reload of the best weights at an lr drop."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, SMALL, run_pipeline
from test_validation import Scripted, run_here, shards_only

from pipeline.config import load_config
from pipeline.data.epoch_rules import build_sampler
from pipeline.data.shards import ShardIndex
from pipeline.models.encoders import build_encoder
from pipeline.parallel import checkpoint
from pipeline.tracking import read_metrics, series
from pipeline.train import loop

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


class StepStarts:
    """two_pass_step wrapped: the model's and the loss's weights each step starts from, by step (the
    weights ReloadBest left, for the step it ran before)."""

    def __init__(self, monkeypatch):
        self.model: dict[int, dict] = {}
        self.loss: dict[int, dict] = {}
        real = loop.two_pass_step

        def recorded(engine, images, labels, loss_fn, *args):
            step = args[2]
            self.model[step] = {k: v.detach().clone() for k, v in engine.full_state_dict().items()}
            self.loss[step] = {k: v.detach().clone() for k, v in loss_fn.state_dict().items()}
            return real(engine, images, labels, loss_fn, *args)
        monkeypatch.setattr(loop, "two_pass_step", recorded)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SCRIPT = [0.9, 0.5, 0.4]  # validations at steps 2, 4, 6: the best is step 2


def reload_args(run) -> list[str]:
    """recipe=ibc on a 6-step run: validation every 2 steps, the lr drop and the reload at step 4."""
    _, clock = build_sampler("ibc", ShardIndex.load(run / "shards" / "train").labels, 32, 4, 0)
    drop = 4 / clock.epoch_start(1)  # the epoch (a fraction of the first) that starts at step 4
    assert clock.step_of(drop) == 4
    return ["stage=finetune", f"run_dir={run}", "recipe=ibc", "data=digits", *SMALL, "train.epochs=null",
            "train.val_every_epochs=0", "train.val_every=2", f"train.milestones=[{drop}]",
            f"train.reload_best_at=[{drop}]", "train.checkpoint_every=100", "track=none"]


def check_reloaded(model: dict, loss: dict, run, args) -> None:
    """Step 4 started from step_2's weights (the best), the model's and the loss's; steps 2, 3 and 4 trained."""
    assert (run / "checkpoints" / "best").read_text() == "step_2"
    assert sorted(model) == list(range(6)) and loss[0], "the MPN loss has weights to reload"
    for part, weights in (("model", model), ("loss", loss)):
        assert same(weights[4], weights[2]), f"step 4 did not start from the {part} weights of step_2, the best"
        assert not same(weights[3], weights[2]) and not same(weights[5], weights[4]), part  # trained before and after
    on_disk = build_encoder(load_config(args[2:]).model, 0)
    checkpoint.load_weights(run / "checkpoints" / "step_2", on_disk)
    assert same(on_disk.state_dict(), model[4]), "step 4's weights are not those in checkpoints/step_2"
    log = (run / "logs" / "rank0.log").read_text()
    assert "[shard] complete, skipped" in log and "step 4: weights of the best checkpoint step_2" in log


def test_ibc_reloads_the_best_weights_at_the_lr_drop(digits_run, tmp_path, monkeypatch):
    """recipe=ibc's rule (the best weights, the model's and the MPN loss's, loaded back at an lr drop) on a
    small run whose scripted validation peaks at step 2: the step after the drop (step 4) starts from
    step 2's weights, not from the weights steps 2 and 3 made. In process, validation scripted."""
    run = tmp_path / "run"
    shards_only(digits_run, run)
    script, starts = Scripted(monkeypatch), StepStarts(monkeypatch)
    script.values = list(SCRIPT)
    args = reload_args(run)
    assert run_here(*args) == 0 and not script.values
    check_reloaded(starts.model, starts.loss, run, args)


@pytest.mark.slow
def test_reload_best_under_zero3_in_two_processes(digits_run, tmp_path):
    """The same run under torchrun, parallel=zero3: ReloadBest loads the partitioned weights through
    DeepSpeed (Engine.load_weights) and the loss's through DCP on both ranks (this file's __main__)."""
    run = tmp_path / "run"
    shards_only(digits_run, run)
    args = [*reload_args(run), "parallel=zero3"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*launcher, __file__, str(tmp_path / "starts.pt"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    check_reloaded(**torch.load(tmp_path / "starts.pt"), run=run, args=args)


if __name__ == "__main__":  # a rank of the torchrun test above: the run scripted and recorded, as in process
    with pytest.MonkeyPatch.context() as patch:
        script, starts = Scripted(patch), StepStarts(patch)
        script.values = list(SCRIPT)
        status = run_here(*sys.argv[2:])
    if status == 0 and os.environ.get("RANK") == "0":
        torch.save({"model": starts.model, "loss": starts.loss}, sys.argv[1])
    sys.exit(status)
