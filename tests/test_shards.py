"""Shards: webdataset layout, random-access index, broken images, the class-disjoint splits."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.config import DataConfig, ModelConfig
from pipeline.data.converters import Record, convert
from pipeline.data.loader import StepBatches, train_loader
from pipeline.data.sampler import PKSampler
from pipeline.data.shards import ShardIndex, write_split
from pipeline.data.transforms import train_transform
from pipeline.errors import UserError


def stream_split(folder):
    """An independent reader: the split's tars through a plain webdataset pipeline, in shard order."""
    urls = [str(p) for p in sorted(folder.glob("*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("__key__", "png", "cls")
    return [(key, img.convert("RGB"), int(label)) for key, img, label in dataset]


def random_records(n: int) -> list[Record]:
    return [Record(f"s{i:03d}", i % 4, Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 24, 3), np.uint8)), {})
            for i in range(n)]


def image(value: int, size=12) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8))


def test_write_index_and_read_back(tmp_path):
    records = [Record(f"s{i:03d}", i % 3, image(i * 10), {"i": i}) for i in range(10)]
    summary = write_split(records, tmp_path, "train", image_size=8, image_format="png", max_count=4, max_size=1 << 20)
    assert summary == {"images": 10, "classes": 3, "shards": 3, "skipped": 0, "skipped_files": [],
                       "images_per_class": {"min": 3, "mean": 3.33, "max": 4}}
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        names = tar.getnames()
    assert sorted(names[:3]) == ["s000.cls", "s000.json", "s000.png"]
    index = ShardIndex.load(tmp_path)
    streamed = list(stream_split(tmp_path))
    assert [k for k, _, _ in streamed] == index.keys == [r.key for r in records]
    assert list(index.labels) == [r.label for r in records] == [lab for _, _, lab in streamed]
    for i in (0, 5, 9):  # random access returns the same pixels as the stream, shrunk to 8 px
        assert index.image(i).size == (8, 8)
        assert np.array_equal(np.asarray(index.image(i)), np.asarray(streamed[i][1]))
        assert np.asarray(index.image(i))[0, 0, 0] == i * 10


def test_broken_images_are_skipped_and_counted(tmp_path):
    image(5).save(tmp_path / "good.png")
    (tmp_path / "text.jpg").write_text("not an image")
    buf = io.BytesIO()
    image(9, size=64).save(buf, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[:200])
    records = [Record(p.stem, 0, p, {"path": p.name}) for p in sorted(tmp_path.iterdir())]
    summary = write_split(records, tmp_path / "out", "test", 8, "jpg", 100, 1 << 20)
    assert (summary["images"], summary["skipped"]) == (1, 2)
    assert sorted(summary["skipped_files"]) == ["text.jpg", "truncated.jpg"]
    assert ShardIndex.load(tmp_path / "out").keys == ["good"]


def test_digits_split_is_class_disjoint():
    splits = convert(DataConfig(name="digits", image_size=16), seed=0)
    train = {r.label for r in splits["train"]}
    test = {r.label for r in splits["test"]}
    assert train == {0, 1, 2, 3, 4} and test == {5, 6, 7, 8, 9}
    assert len(splits["train"]) + len(splits["test"]) == 1797
    assert splits["train"][0].image.size == (16, 16)


def test_imagefolder_split_is_seeded_and_class_disjoint(tmp_path):
    for c in range(6):
        (tmp_path / f"class{c}").mkdir()
        for j in range(2):
            image(c).save(tmp_path / f"class{c}" / f"{j}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), test_fraction=0.5)
    a, b = convert(cfg, seed=1), convert(cfg, seed=1)
    train, test = {r.meta["class"] for r in a["train"]}, {r.meta["class"] for r in a["test"]}
    assert len(test) == 3 and not train & test and len(train | test) == 6
    assert [r.key for r in a["test"]] == [r.key for r in b["test"]]


def test_shard_stage_artifacts(digits_run):
    summary = json.loads((digits_run / "shards" / "summary.json").read_text())
    assert summary["splits"]["train"]["images"] == 901 and summary["splits"]["test"]["images"] == 896
    assert summary["splits"]["train"]["classes"] == 5
    assert list((digits_run / "shards" / "train").glob("*.tar"))


class TestPKSampler:
    labels = np.repeat(np.arange(10), [5, 5, 5, 5, 5, 3, 8, 2, 6, 4])

    def test_groups_of_k_and_deterministic(self):
        sampler = PKSampler(self.labels, batch_size=16, samples_per_class=4, seed=0)
        batch = sampler.batch(3)
        assert len(batch) == 16 and np.array_equal(batch, sampler.batch(3))
        assert not np.array_equal(batch, sampler.batch(4))
        counts = np.bincount(self.labels[batch])
        assert set(counts[counts > 0]) == {4}
        for c in np.unique(self.labels[batch]):  # distinct samples where the class has K of them
            if (self.labels == c).sum() >= 4:
                assert len(set(batch[self.labels[batch] == c])) == 4

    def test_more_groups_than_classes(self):
        labels = np.repeat(np.arange(3), 20)
        batch = PKSampler(labels, batch_size=24, samples_per_class=4, seed=1).batch(0)
        assert sorted(np.bincount(labels[batch])) == [8, 8, 8]
        assert len(set(batch)) == 24  # distinct samples while the classes have enough

    def test_small_classes_repeat_or_skip(self):
        """labels: class 5 has 3 images, class 7 has 2, class 9 has 4. With K = 4, `skip` (the RS@k
        authors' rule) never draws 5 and 7; `repeat` draws them, repeating their images."""
        drawn = {}
        for rule in ("repeat", "skip"):
            sampler = PKSampler(self.labels, batch_size=16, samples_per_class=4, seed=0, small_classes=rule)
            drawn[rule] = set(np.concatenate([self.labels[sampler.batch(s)] for s in range(40)]).tolist())
            assert sampler.settings()["small_classes"] == rule
        assert drawn["repeat"] == set(range(10)) and drawn["skip"] == set(range(10)) - {5, 7}
        with pytest.raises(UserError, match="train.small_classes=skip leaves 1 of 10 classes"):
            PKSampler(self.labels, batch_size=16, samples_per_class=7, seed=0, small_classes="skip")

    def test_rank_shares_partition_the_global_batch(self):
        """Any world size sees the same (sample, augmentation seed) pairs at a step, split by rank."""
        sampler = PKSampler(self.labels, batch_size=16, samples_per_class=4, seed=0)
        whole = list(StepBatches(sampler, 5, 7, rank=0, world_size=1))
        for world in (2, 4):
            shares = [list(StepBatches(sampler, 5, 7, rank=r, world_size=world)) for r in range(world)]
            for s in range(2):
                assert sum((share[s] for share in shares), []) == whole[s]
        assert [i for i, _ in whole[0]] == list(sampler.batch(5))


def test_parallel_writing_is_byte_identical_to_serial(tmp_path):
    """Worker processes decode and encode; the tars, index and summary equal the serial run's."""
    (tmp_path / "broken.jpg").write_text("not an image")
    records = [Record(f"s{i:03d}", i % 4, image(i * 7, size=16 + i), {"i": i}) for i in range(23)]
    records.insert(5, Record("broken", 1, tmp_path / "broken.jpg", {"path": "broken.jpg"}))
    serial = write_split(records, tmp_path / "serial", "train", 12, "jpg", max_count=5, max_size=1 << 20, workers=0)
    parallel = write_split(records, tmp_path / "parallel", "train", 12, "jpg", max_count=5, max_size=1 << 20, workers=2)
    assert serial == parallel and serial["skipped"] == 1 and serial["shards"] == 5
    names = sorted(p.name for p in (tmp_path / "serial").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "parallel").iterdir())
    for name in names:
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes(), name


def test_index_reads_each_sample_from_its_shard(tmp_path):
    records = [Record(f"s{i:03d}", i % 3, image(i * 20), {}) for i in range(10)]
    write_split(records, tmp_path, "train", 8, "png", max_count=4, max_size=1 << 20)
    index = ShardIndex.load(tmp_path)
    assert list(index.shard_counts()) == [4, 4, 2]
    assert list(index.locations[:, 0]) == [0] * 4 + [1] * 4 + [2] * 2
    for i in range(10):  # the byte range is the image member inside that shard's tar
        shard, offset, size = index.locations[i]
        with tarfile.open(tmp_path / index.shards[shard]) as tar:
            member = tar.getmember(f"{index.keys[i]}.png")
            assert (member.offset_data, member.size) == (offset, size)
        assert np.asarray(index.image(i))[0, 0, 0] == i * 20


def test_rank_slices_are_disjoint_and_make_the_global_batch():
    labels = np.repeat(np.arange(12), 6)
    sampler = PKSampler(labels, batch_size=24, samples_per_class=4, seed=3)
    for step in (0, 9):
        for world in (1, 2, 3, 4):
            slices = [sampler.rank_slice(step, r, world) for r in range(world)]
            assert all(len(i) == 24 // world for i, _ in slices)
            assert np.array_equal(np.concatenate([i for i, _ in slices]), sampler.batch(step))
            assert np.array_equal(np.concatenate([s for _, s in slices]), sampler.augmentation_seeds(step))
            assert len(set(np.concatenate([i for i, _ in slices]))) == 24  # no sample on two ranks
    with pytest.raises(UserError, match="multiple of the 5 processes"):
        sampler.rank_slice(0, 0, 5)


def test_loader_workers_give_the_same_augmented_batches(tmp_path):
    """Decoding and augmentation in DataLoader workers, seeded per sample: same tensors as in-process."""
    records = random_records(32)
    write_split(records, tmp_path, "train", 16, "png", max_count=10, max_size=1 << 20)
    index = ShardIndex.load(tmp_path)
    sampler = PKSampler(index.labels, batch_size=8, samples_per_class=2, seed=0)
    transform = train_transform(DataConfig(crop_scale=[0.3, 1.0]), ModelConfig(image_size=12))
    runs = [list(train_loader(index, transform, sampler, 2, 5, workers=w)) for w in (0, 2)]
    assert len(runs[0]) == 3
    for (a, la), (b, lb) in zip(*runs):
        assert a.shape == (8, 3, 12, 12) and torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(runs[0][0][0], runs[0][1][0])


def test_loader_batches_equal_the_per_image_transform(tmp_path):
    """The float conversion and normalisation run per batch; the result is the per-image transform's."""
    records = random_records(16)
    write_split(records, tmp_path, "train", 16, "png", max_count=10, max_size=1 << 20)
    index = ShardIndex.load(tmp_path)
    sampler = PKSampler(index.labels, batch_size=8, samples_per_class=2, seed=0)
    transform = train_transform(DataConfig(crop_scale=[0.3, 1.0]), ModelConfig(image_size=12, mean=[0.4, 0.5, 0.6],
                                                                               std=[0.2, 0.3, 0.4]))
    (images, labels), = list(train_loader(index, transform, sampler, 3, 4))
    pairs = list(StepBatches(sampler, 3, 4, 0, 1))[0]
    expected = []
    for i, seed in pairs:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            expected.append(transform(index.image(i)))
    assert images.dtype == torch.float32
    torch.testing.assert_close(images, torch.stack(expected), rtol=0, atol=0)
    assert labels.tolist() == [int(index.labels[i]) for i, _ in pairs]


def test_shard_workers_are_chosen_from_the_cores_and_images():
    from pipeline.data.shards import auto_workers
    assert auto_workers(160, cores=16) == 0 and auto_workers(None, cores=16) == 0  # small or unknown: none
    assert auto_workers(100_000, cores=2) == 0  # the main process needs the one other core
    assert auto_workers(5_000, cores=16) == 5 and auto_workers(100_000, cores=16) == 8 and auto_workers(100_000, cores=4) == 3


def test_the_shard_stage_writes_the_same_tars_whatever_the_workers(tmp_path, caplog):
    """data.shard_workers unset (auto: none for 48 images), 0 and 2 give byte-identical shards (two splits:
    a pool of workers is started per split)."""
    import logging

    from pipeline.config import load_config
    from pipeline.run_context import RunContext
    from pipeline.stages import shard
    from test_validation import image_folder

    image_folder(tmp_path / "images", classes=8, per_class=6)
    tars = {}
    for workers in (None, 0, 2):
        run = tmp_path / f"run{workers}"
        args = ["data=imagefolder", f"data.root={tmp_path / 'images'}", "data.image_size=16", "data.shard_max_count=10",
                "data.val_classes=0"]
        cfg = load_config(args + ([] if workers is None else [f"data.shard_workers={workers}"]))
        assert cfg.data.shard_workers == workers
        with caplog.at_level(logging.INFO):
            shard.run(cfg, RunContext.resolve(cfg, run_dir=run))
        tars[workers] = {p.relative_to(run): p.read_bytes() for p in sorted((run / "shards").rglob("*.tar"))}
    assert len(tars[0]) > 2 and tars[None] == tars[0] == tars[2]
    assert "shard test: 0 worker process(es) for 24 images (data.shard_workers sets it)" in caplog.messages
