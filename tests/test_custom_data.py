"""A user's own data says what was done with it: empty class folders, unreadable folders, files that are
not images and missing CSV files are named in the shard log and shards/summary.json; a validation split
too small to rank and a batch that needs more classes than the split has warn with the numbers; the
retrieval pictures name classes by the dataset's own names."""
import json
import logging

import numpy as np
from PIL import Image

from pipeline.config import load_config
from pipeline.run_context import RunContext
from pipeline.data.sampler import PKSampler
from pipeline.data.shards import ShardIndex
from pipeline.eval import results
from pipeline.protocols import Evaluation
from pipeline.run_dir import RunDir
from pipeline.stages import shard
from pipeline.train.validation import MIN_CLASSES, Validator


def png(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), value, dtype=np.uint8)).save(path)


def folder_with_leftovers(root, classes: int = 6) -> None:
    """root/<animal>/i.png for `classes` classes, plus an empty class folder and two files that are not images."""
    for c in range(classes):
        for i in range(3):
            png(root / f"animal{c}" / f"{i}.png", (17 * c + i) % 256)
    (root / "empty_class").mkdir()
    (root / "animal0" / "notes.txt").write_text("not an image")
    (root / "README.txt").write_text("not in a class folder")


def shard_folder(tmp_path, caplog, *args: str) -> dict:
    cfg = load_config(["data=imagefolder", f"data.root={tmp_path / 'images'}", "data.shard_workers=0",
                       "data.val_classes=0", *args])
    with caplog.at_level(logging.INFO):
        shard.run(cfg, RunContext.resolve(cfg, run_dir=tmp_path / "run"))
    return json.loads((tmp_path / "run" / "shards" / "summary.json").read_text())


def test_empty_class_folder_and_text_files_are_named_in_the_log_and_summary(tmp_path, caplog):
    folder_with_leftovers(tmp_path / "images")
    summary = shard_folder(tmp_path, caplog)
    left_out = summary["left_out"]
    assert left_out["empty_classes"] == {"count": 1, "names": ["empty_class"]}
    assert left_out["ignored_files"] == {"count": 2, "names": ["README.txt", "animal0/notes.txt"]}
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("left out 1 class folder(s) or label(s) with no image" in line and "empty_class" in line for line in lines)
    assert any("2 file(s) that are not images" in line and "animal0/notes.txt" in line for line in lines)
    # the empty folder is not a class: 6 classes, split 3 + 3 (test_fraction 0.5), none of them empty
    assert summary["splits"]["train"]["classes"] + summary["splits"]["test"]["classes"] == 6
    assert all(s["images_per_class"]["min"] == 3 for s in summary["splits"].values())


def test_a_clean_folder_reports_nothing_left_out(tmp_path, caplog):
    for c in range(4):
        png(tmp_path / "images" / f"c{c}" / "0.png", c)
    assert shard_folder(tmp_path, caplog)["left_out"] == {}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_csv_rows_missing_or_not_images_are_named(tmp_path, caplog):
    rows = ["path,label"] + [f"imgs/{c}_{j}.png,{c}" for c in ("cat", "dog", "fox", "owl") for j in range(2)]
    for row in rows[1:]:
        png(tmp_path / row.split(",")[0], len(row))
    rows += ["imgs/gone.png,cat", "imgs/ghost.png,yak", "imgs/notes.txt,dog"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(["data=csv", f"data.root={tmp_path / 'labels.csv'}", "data.shard_workers=0",
                       "data.val_classes=0"])
    with caplog.at_level(logging.INFO):
        shard.run(cfg, RunContext.resolve(cfg, run_dir=tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "shards" / "summary.json").read_text())
    assert summary["left_out"] == {"empty_classes": {"count": 1, "names": ["yak"]},
                                   "ignored_files": {"count": 1, "names": ["imgs/notes.txt"]},
                                   "missing_files": {"count": 2, "names": ["imgs/gone.png", "imgs/ghost.png"]}}
    assert sum(s["classes"] for s in summary["splits"].values()) == 4
    assert any("imgs/ghost.png" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_class_names_are_kept_in_the_index_and_used_by_the_retrieval_pictures(tmp_path, caplog):
    folder_with_leftovers(tmp_path / "images")
    shard_folder(tmp_path, caplog)
    rd = RunDir(tmp_path / "run")
    index = ShardIndex.load(rd.shards / "test")
    names = {index.class_name(label) for label in index.labels}
    assert len(names) == 3 and all(name.startswith("animal") for name in names)
    assert ShardIndex(rd.shards, [], [], np.zeros(0), np.zeros((0, 3))).class_name(7) == "class 7"  # no names
    rng = np.random.default_rng(0)
    shown = {"frozen": {"test": {"embeddings": rng.normal(size=(len(index), 8)).astype(np.float32),
                                 "labels": index.labels, "keys": np.array(index.keys)}}}
    cfg = load_config(["data=imagefolder", "eval.show_queries=2", "eval.show_k=2"])
    results.draw_retrievals(cfg, rd, Evaluation("test", "test"), shown, tmp_path)
    rows = json.loads((tmp_path / "retrievals.json").read_text())["rows"]
    assert rows and all(row["class"] == f"animal{row['label']}" for row in rows)


def validator_on(tmp_path, caplog, val_classes: int) -> Validator:
    folder_with_leftovers(tmp_path / "images", classes=2 * (val_classes + 2))
    shard_folder(tmp_path, caplog, f"data.val_classes={val_classes}")
    caplog.clear()
    cfg = load_config(["data=imagefolder", f"data.val_classes={val_classes}"])
    with caplog.at_level(logging.INFO):
        return Validator(cfg, RunContext.resolve(cfg, run_dir=tmp_path / "run"))


def test_a_validation_split_too_small_to_rank_warns_how_to_change_it(tmp_path, caplog):
    validator = validator_on(tmp_path, caplog, val_classes=2)
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"validation on val has 2 classes (fewer than {MIN_CLASSES})" in line
    assert "data.val_classes=2 now" in line and "train.val_split=test" in line
    caplog.clear()
    with caplog.at_level(logging.INFO):
        validator.warn_saturated(0.9)
        validator.warn_saturated(1.0)
        validator.warn_saturated(1.0)  # once per run
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("val/recall@1 is 1.0 on val (2 classes)") and "data.val_classes" in line


def test_a_large_enough_validation_split_does_not_warn(tmp_path, caplog):
    validator_on(tmp_path, caplog, val_classes=MIN_CLASSES)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_batch_needing_more_classes_than_the_split_has_warns_with_the_numbers(caplog):
    labels = np.repeat(np.arange(27), 6)
    with caplog.at_level(logging.INFO):
        PKSampler(labels, 128, 4, seed=0)
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "needs 32 classes per batch but the training split has 27" in line and "to 108" in line
    caplog.clear()
    with caplog.at_level(logging.INFO):
        PKSampler(labels, 108, 4, seed=0)
    assert not caplog.records
    with caplog.at_level(logging.INFO):  # the digits demo: 32 groups of 5 classes with 180 images each
        sampler = PKSampler(np.repeat(np.arange(5), 180), 128, 4, seed=0)
    assert not caplog.records
    assert len(set(sampler.batch(0).tolist())) == 128  # distinct images: nothing worth a warning
