"""Validation during training: the held-out val split, the values it logs, checkpoints/best through a
run whose metric goes up then down, keep_checkpoints, resuming, and export/eval of `best`."""
import contextlib
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from conftest import SMALL
from PIL import Image

from pipeline import runner
from pipeline.config import load_config
from pipeline.run_context import RunContext
from pipeline.data.shards import ShardIndex
from pipeline.data.transforms import eval_transform
from pipeline.parallel import checkpoint
from pipeline.parallel.preemption import EXIT_STATUS
from pipeline.errors import UserError
from pipeline.eval import sources
from pipeline.eval.metrics import retrieval_metrics
from pipeline.models.encoders import build_encoder
from pipeline.run_dir import RunDir
from pipeline.stages import shard
from pipeline.tracking import read_metrics
from pipeline.train.validation import Validator, metric_names


def image_folder(root, classes: int, per_class: int = 3):
    """root/classNN/i.png: noise around a colour of the class."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal([c * 20, 255 - c * 20, 128], 40, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c:02d}" / f"{i}.png")


def shard_labels(run) -> dict[str, set[int]]:
    summary = json.loads((run / "shards" / "summary.json").read_text())
    return {split: set(ShardIndex.load(run / "shards" / split).labels.tolist()) for split in summary["splits"]}


def shard_here(tmp_path, name: str, *args: str) -> dict[str, set[int]]:
    run = tmp_path / name
    cfg = load_config(["data=imagefolder", f"data.root={tmp_path / 'images'}", "data.shard_workers=0", *args])
    shard.run(cfg, RunContext.resolve(cfg, run_dir=run))
    return shard_labels(run)


def test_val_classes_are_held_out_of_train_seeded_and_disjoint(tmp_path):
    image_folder(tmp_path / "images", classes=12)  # test_fraction 0.5: 6 test classes, 6 for train and val
    first = shard_here(tmp_path, "a", "data.val_classes=0.34")
    assert set(first) == {"train", "val", "test"} and len(first["val"]) == 2 and len(first["train"]) == 4
    assert not (first["train"] & first["val"] or first["train"] & first["test"] or first["val"] & first["test"])
    assert first["train"] | first["val"] | first["test"] == set(range(12))
    without = shard_here(tmp_path, "b", "data.val_classes=0")
    assert set(without) == {"train", "test"} and without["test"] == first["test"]
    assert without["train"] == first["train"] | first["val"]  # val comes out of train only
    assert shard_here(tmp_path, "c", "data.val_classes=0.34") == first  # same seed, same split
    assert shard_here(tmp_path, "d", "data.val_classes=3")["val"] < without["train"]  # a count: 3 classes
    assert len(shard_here(tmp_path, "e", "data.val_classes=3")["val"]) == 3
    others = [shard_here(tmp_path, f"s{seed}", "data.val_classes=0.34", f"seed={seed}")["val"] for seed in (1, 2, 3)]
    assert any(val != first["val"] for val in others)  # the draw depends on the seed
    with pytest.raises(UserError, match="holds out 5 of the 6 training classes; at most 4"):
        shard_here(tmp_path, "f", "data.val_classes=5")
    with pytest.raises(UserError, match="data.val_classes=2.5: a fraction below 1"):
        load_config(["data.val_classes=2.5"])


def test_validation_settings_rerun_nothing_but_val_classes_reshards(tmp_path):
    rd = RunDir(tmp_path)
    base = load_config([])
    fingerprint = lambda args, stage: runner.fingerprint(load_config(args), rd, stage)  # noqa: E731
    for args in (["train.val_every=7"], ["train.val_split=test"], ["train.best_metric=val/map@r"], ["track=none"]):
        assert fingerprint(args, "finetune") == runner.fingerprint(base, rd, "finetune"), args
    assert fingerprint(["data.val_classes=0.2"], "shard") != runner.fingerprint(base, rd, "shard")
    assert fingerprint(["train.grad_clip=1.0"], "finetune") != runner.fingerprint(base, rd, "finetune")
    with pytest.raises(UserError, match="train.best_metric=val/recall@3: use one of val/recall@1, "):
        load_config(["train.best_metric=val/recall@3"])


def test_validation_values_are_the_eval_stage_metrics_of_the_same_weights(digits_run):
    """digits validates on its test split (no classes to hold out of five), at the last step, with the
    weights the export then takes: the logged values are the eval stage's for the finetuned model."""
    logged = {r["name"]: r["value"] for r in read_metrics(digits_run / "logs" / "metrics.jsonl")
              if r["name"].startswith("val/") and r["step"] == 6}
    metrics = json.loads((digits_run / "eval" / "metrics.json").read_text())["finetuned"]
    assert set(logged) == set(metric_names([1, 2, 4, 8]))
    for name, value in logged.items():
        assert value == pytest.approx(metrics[name[len("val/"):]], abs=2 / 896), name
    assert (digits_run / "checkpoints" / "best").read_text() == "step_6"
    assert "validation runs on the test split" in (digits_run / "logs" / "rank0.log").read_text()


class Scripted:
    """Validator.run replaced by a script of recall@1 values, one per validation, in order (so a
    validation the run should not do finds the script empty and fails)."""

    def __init__(self, monkeypatch):
        self.values: list[float] = []
        script = self

        def run(validator, model):
            value = script.values.pop(0)
            return {name: value for name in metric_names(validator.ks)}
        monkeypatch.setattr(Validator, "run", run)


@contextlib.contextmanager
def root_logging_kept():
    """runner.main sets up logging for its run directory; the test process's logging is put back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level


def run_here(*args: str) -> int:
    with root_logging_kept():
        return runner.main(list(args))


def shards_only(digits_run, run):
    shutil.copytree(digits_run / "shards", run / "shards")
    (run / "stages").mkdir()
    shutil.copy(digits_run / "stages" / "shard.json", run / "stages" / "shard.json")


def steps_on_disk(run) -> set[str]:
    return {p.name for p in (run / "checkpoints").glob("step_*")}


def val_values(run) -> dict[int, float]:
    values = {}
    for r in read_metrics(run / "logs" / "metrics.jsonl"):
        if r["name"] == "val/recall@1":
            assert r["step"] not in values, f"validated twice at step {r['step']}"
            values[r["step"]] = r["value"]
    return values


SCRIPTED = [*SMALL, "train.val_every=2", "train.keep_checkpoints=1", "train.checkpoint_every=100"]


def test_best_checkpoint_follows_the_metric_up_then_down_and_survives_keep_and_resume(digits_run, tmp_path,
                                                                                   monkeypatch):
    run = tmp_path / "run"
    shards_only(digits_run, run)
    script = Scripted(monkeypatch)
    script.values = [0.5, 0.7, 0.6, 0.4]  # steps 2, 4, 6, 8: up, then down
    assert run_here("stage=finetune", f"run_dir={run}", *SCRIPTED, "train.max_steps=8") == 0
    assert not script.values
    assert (run / "checkpoints" / "best").read_text() == "step_4"
    assert steps_on_disk(run) == {"step_4", "step_8"}  # keep_checkpoints=1 kept the latest, and best
    meta = json.loads((run / "checkpoints" / "step_8" / "meta.json").read_text())
    assert meta["validation"] == {"metric": "val/recall@1", "split": "test", "value": 0.7, "step": 4, "validated": 8}
    assert val_values(run) == {2: 0.5, 4: 0.7, 6: 0.6, 8: 0.4}

    # Resumed: the best so far (0.7) comes from the checkpoint, so 0.65 is no new best; step 8 is
    # not validated again.
    script.values = [0.65]
    assert run_here("stage=finetune", f"run_dir={run}", *SCRIPTED, "train.max_steps=10") == 0
    assert not script.values and (run / "checkpoints" / "best").read_text() == "step_4"
    assert steps_on_disk(run) == {"step_4", "step_10"}
    assert val_values(run) == {2: 0.5, 4: 0.7, 6: 0.6, 8: 0.4, 10: 0.65}

    # export.checkpoint=best and eval.checkpoint=best take step 4, not the latest.
    assert run_here("stage=export", f"run_dir={run}", *SCRIPTED, "train.max_steps=10", "export.checkpoint=best") == 0
    assert json.loads((run / "export" / "source.json").read_text())["step"] == 4
    assert sources.resolve("best", cfg := load_config(SCRIPTED), RunDir(run)).path == "checkpoints/step_4"
    by_hand = build_encoder(cfg.model, cfg.seed)
    checkpoint.load_weights(run / "checkpoints" / "step_4", by_hand)
    from pipeline.models.encoders import load_exported

    exported = load_exported(run / "export")
    for name, tensor in by_hand.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name

    # A new best moves the pointer, and the old best goes the way keep_checkpoints says.
    script.values = [0.9]
    assert run_here("stage=finetune", f"run_dir={run}", *SCRIPTED, "train.max_steps=12") == 0
    assert (run / "checkpoints" / "best").read_text() == "step_12" and steps_on_disk(run) == {"step_12"}


def test_a_stop_before_validating_validates_on_resume_once(digits_run, tmp_path, monkeypatch):
    """A stop request at a step due for validation checkpoints at once; the resumed run validates
    that step first, records it in that checkpoint, and never again."""
    run = tmp_path / "run"
    shards_only(digits_run, run)
    script = Scripted(monkeypatch)
    stop_file = tmp_path / "stop"
    stop_file.touch()
    monkeypatch.setenv("PIPELINE_STOP_FILE", str(stop_file))
    args = [*SMALL, "train.val_every=1", "train.max_steps=3", "train.keep_checkpoints=5"]
    assert run_here("stage=finetune", f"run_dir={run}", *args) == EXIT_STATUS  # stopped after step 1
    assert json.loads((run / "checkpoints" / "step_1" / "meta.json").read_text())["validation"]["validated"] is None
    assert not (run / "checkpoints" / "best").exists()
    script.values = [0.5, 0.6, 0.55]  # steps 1 (on resume), 2, 3
    assert run_here("stage=finetune", f"run_dir={run}", *args) == 0
    assert not script.values and val_values(run) == {1: 0.5, 2: 0.6, 3: 0.55}
    assert json.loads((run / "checkpoints" / "step_1" / "meta.json").read_text())["validation"]["validated"] == 1
    assert (run / "checkpoints" / "best").read_text() == "step_2"


def test_a_stop_during_validation_checkpoints_that_step_before_another(digits_run, tmp_path, monkeypatch):
    """A stop request that comes while the step's validation runs (after the step's own check) checkpoints
    that step, its validation recorded, instead of training one more step first."""
    run = tmp_path / "run"
    shards_only(digits_run, run)
    script = Scripted(monkeypatch)
    stop_file = tmp_path / "stop"
    monkeypatch.setenv("PIPELINE_STOP_FILE", str(stop_file))
    validate = Validator.run

    def validate_then_ask_to_stop(validator, model):
        stop_file.touch()
        return validate(validator, model)
    monkeypatch.setattr(Validator, "run", validate_then_ask_to_stop)
    script.values = [0.5]
    args = [*SMALL, "train.val_every=2", "train.max_steps=4", "train.keep_checkpoints=5"]
    assert run_here("stage=finetune", f"run_dir={run}", *args) == EXIT_STATUS
    assert steps_on_disk(run) == {"step_2"} and (run / "checkpoints" / "latest").read_text() == "step_2"
    assert json.loads((run / "checkpoints" / "step_2" / "meta.json").read_text())["validation"]["validated"] == 2
    assert not script.values and val_values(run) == {2: 0.5}


def test_training_validates_on_the_held_out_classes(tmp_path):
    """imagefolder with data.val_classes: finetune validates on shards/val (not test), and the logged
    values are those of the step's weights embedding shards/val, computed here by hand."""
    image_folder(tmp_path / "images", classes=12, per_class=6)
    run = tmp_path / "run"
    args = ["data=imagefolder", f"data.root={tmp_path / 'images'}", "data.shard_workers=0", "data.workers=0",
            "data.image_size=32", "data.image_format=png", "data.val_classes=0.34", *SMALL, "train.max_steps=2",
            "train.val_every=2"]
    assert run_here("stage=finetune", f"run_dir={run}", *args) == 0
    logged = {r["name"]: r["value"] for r in read_metrics(run / "logs" / "metrics.jsonl") if r["name"].startswith("val/")}
    meta = json.loads((run / "checkpoints" / "step_2" / "meta.json").read_text())
    assert meta["validation"]["split"] == "val" and (run / "checkpoints" / "best").read_text() == "step_2"
    assert "validation runs on the test split" not in (run / "logs" / "rank0.log").read_text()
    cfg = load_config(args)
    model = build_encoder(cfg.model, cfg.seed)
    checkpoint.load_weights(run / "checkpoints" / "step_2", model)
    index = ShardIndex.load(run / "shards" / "val")
    images = torch.stack([eval_transform(cfg.model)(index.image(i)) for i in range(len(index))])
    with torch.no_grad():
        by_hand = retrieval_metrics(model.eval()(images), index.labels, nmi=False)
    assert set(index.labels.tolist()) == shard_labels(run)["val"] and len(set(index.labels.tolist())) == 2
    for name, value in logged.items():
        assert value == pytest.approx(by_hand[name[len("val/"):]], abs=1e-6), name


def validator_of(args: list[str], rd: RunDir) -> Validator:
    cfg = load_config([*args, "device=cpu"])
    return Validator(cfg, RunContext.resolve(cfg, run_dir=rd.root))


def test_validation_split_errors_are_one_line(digits_run, tmp_path):
    rd = RunDir(digits_run)
    with pytest.raises(UserError, match="train.val_split=val but the shards have no such split .*set data.val_classes"):
        validator_of(["train.val_split=val"], rd)
    with pytest.raises(UserError, match="train.val_split=nowhere but the shards have no such split"):
        validator_of(["train.val_split=nowhere"], rd)
    assert validator_of(["train.val_split=train"], rd).evaluation.query == "train"
    with pytest.raises(UserError, match="has no best checkpoint"):
        checkpoint.find("best", tmp_path)


def test_best_ignores_nan_keeps_the_earlier_of_ties_and_restores_only_the_same_metric():
    from pipeline.train.validation import Best

    best = Best("val/recall@1", "test")
    assert best.update(2, {"val/recall@1": float("nan")}) is False and best.validated == 2
    assert best.update(4, {"val/recall@1": 0.3}) and best.checkpoint == "step_4"
    assert not best.update(6, {"val/recall@1": 0.3})  # a tie keeps the earlier
    assert Best.restore(best.state(), "val/map@r", "test").value is None  # another metric: chosen afresh
    assert Best.restore(best.state(), "val/recall@1", "test") == best
    assert Best.restore(best.state(), "val/recall@1", "val").value is None  # another split: afresh too
