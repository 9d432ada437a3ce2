"""The fashion_mnist converter on IDX fixture files written in the exact format, and its errors."""
import gzip
import struct

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data.converters import convert
from pipeline.data.converters.fashion_mnist import read_idx
from pipeline.errors import UserError


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fixture(root, n_train=30, n_test=20):
    rng = np.random.default_rng(0)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        data[prefix] = images, labels
    return data


def test_open_set_split(tmp_path):
    data = fixture(tmp_path)
    splits = {k: list(v) for k, v in convert(DataConfig(name="fashion_mnist", root=str(tmp_path), image_size=28), 0).items()}
    train, test = splits["train"], splits["test"]
    assert sorted({r.label for r in train}) == [0, 1, 2, 3, 4] and len(train) == 15
    assert sorted({r.label for r in test}) == [5, 6, 7, 8, 9] and len(test) == 10
    first = train[0]
    assert np.array_equal(np.asarray(first.image), data["train"][0][first.meta["index"]])
    assert np.array_equal(np.asarray(test[0].image), data["t10k"][0][test[0].meta["index"]])
    assert len({r.key for r in train + test}) == 25
    resized = next(iter(convert(DataConfig(name="fashion_mnist", root=str(tmp_path), image_size=32), 0)["test"]))
    assert resized.image.size == (32, 32)


def test_read_idx_round_trip_and_bad_file(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", array)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), array)
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="not a readable gzipped IDX file"):
        read_idx(tmp_path / "bad.gz")


def test_missing_root_says_what_to_install(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist, or set data.root"):
        convert(DataConfig(name="fashion_mnist", root=str(tmp_path / "nowhere")), 0)
