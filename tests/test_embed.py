"""The embed stage across processes: each rank embeds its shards; merged in shard order; resumable."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, SMALL, run_pipeline, run_torchrun
from PIL import Image

from pipeline.config import ModelConfig, load_config
from pipeline.data.converters import Record
from pipeline.data.shards import write_split
from pipeline.data.transforms import eval_transform
from pipeline.eval.inference import embed_split, load_embeddings, save_embeddings
from pipeline.models.encoders import build_encoder, load_exported

# Digits in shards of 100 (written by 2 processes): 10 train shards, 9 test shards, so two ranks get
# unequal shares.
SHARDED = [*SMALL, "data.shard_max_count=100", "eval.batch_size=64", "data.shard_workers=2"]


def assert_same_embeddings(a: dict, b: dict) -> None:
    assert np.array_equal(a["keys"], b["keys"]) and np.array_equal(a["labels"], b["labels"])
    np.testing.assert_allclose(a["embeddings"], b["embeddings"], rtol=1e-5, atol=1e-6)


def single_process(run_dir) -> dict:
    """The frozen encoder over run_dir's shards, embedded here, in one process."""
    cfg = load_config(["stage=embed", *SHARDED])
    model = build_encoder(cfg.model, cfg.seed)
    return {split: embed_split(model, run_dir / "shards" / split, eval_transform(cfg.model), 64, torch.device("cpu"))
            for split in ("train", "test")}


def test_two_ranks_give_the_single_process_embeddings(tmp_path):
    run_torchrun(2, "stage=embed", f"run_dir={tmp_path}", *SHARDED, "data.workers=1")
    for split, expected in single_process(tmp_path).items():
        assert_same_embeddings(load_embeddings(tmp_path / "embeddings" / "frozen" / f"{split}.npz"), expected)
    assert len(list((tmp_path / "shards" / "test").glob("*.tar"))) == 9  # unequal shares: 5 and 4 shards
    assert not (tmp_path / "embeddings" / "frozen.parts").exists()
    assert "Traceback" not in (tmp_path / "logs" / "rank1.log").read_text()


@pytest.mark.slow
def test_accelerate_launch(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` starts torch.distributed.run; on a machine
    without GPUs the ranks join a gloo group on the CPU. (`--cpu` would start one process.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(REPO / "pipeline" / "run.py"), "stage=embed", f"run_dir={tmp_path}", *SHARDED]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "logs" / "rank1.log").is_file()
    for split, expected in single_process(tmp_path).items():
        assert_same_embeddings(load_embeddings(tmp_path / "embeddings" / "frozen" / f"{split}.npz"), expected)


def small_split(tmp_path):
    records = [Record(f"s{i:03d}", i % 5, Image.fromarray(np.full((8, 8, 3), 3 * i, np.uint8)), {}) for i in range(50)]
    write_split(records, tmp_path / "split", "test", 8, "png", max_count=8, max_size=1 << 20)
    cfg = ModelConfig(image_size=8, patch_size=4, depth=1, embed_dim=8, mean=[0.5] * 3, std=[0.5] * 3)
    return records, build_encoder(cfg, seed=0), eval_transform(cfg)


def test_dataloader_workers_split_the_shards_and_the_merge_restores_order(tmp_path):
    records, model, transform = small_split(tmp_path)
    one = embed_split(model, tmp_path / "split", transform, 16, torch.device("cpu"), workers=0)
    three = embed_split(model, tmp_path / "split", transform, 16, torch.device("cpu"), workers=3)
    assert_same_embeddings(three, one)
    assert list(one["keys"]) == [r.key for r in records] and list(one["labels"]) == [r.label for r in records]


def test_rerun_after_a_crash_embeds_only_the_missing_shards(tmp_path):
    records, model, transform = small_split(tmp_path)
    full = embed_split(model, tmp_path / "split", transform, 16, torch.device("cpu"), parts=tmp_path / "parts")
    assert full["embeddings"].shape == (50, 8) and list(full["keys"]) == [r.key for r in records]
    x = torch.stack([transform(r.image.convert("RGB")) for r in records])
    with torch.no_grad():  # each row is the model's output for that image (another batching)
        np.testing.assert_allclose(full["embeddings"], model.eval()(x).numpy(), rtol=1e-5, atol=1e-6)
    # "crash": shard 3's part was never written; shard 1's part (marked with zeros) must be reused
    (tmp_path / "parts" / "000003.npz").unlink()
    part = load_embeddings(tmp_path / "parts" / "000001.npz")
    save_embeddings(tmp_path / "parts" / "000001.npz", {**part, "embeddings": np.zeros_like(part["embeddings"])})
    again = embed_split(model, tmp_path / "split", transform, 16, torch.device("cpu"), parts=tmp_path / "parts")
    assert np.all(again["embeddings"][8:16] == 0)  # reused, not recomputed
    np.testing.assert_allclose(again["embeddings"][24:32], full["embeddings"][24:32], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(again["embeddings"][16:24], full["embeddings"][16:24])


@pytest.mark.slow
def test_embed_stage_resumes_from_its_parts(tmp_path):
    """The stage crashes on a damaged test shard after finishing train; once the shard is restored,
    the rerun reuses train's saved parts (one marked with zeros shows it) and cleans up."""
    run_pipeline("stage=shard", f"run_dir={tmp_path}", *SHARDED)
    shard = tmp_path / "shards" / "test" / "test-000004.tar"
    good = shard.read_bytes()
    shard.write_bytes(good[:3000])
    assert run_pipeline("stage=embed", f"run_dir={tmp_path}", *SHARDED, check=False).returncode != 0
    parts = tmp_path / "embeddings" / "frozen.parts"
    assert len(list((parts / "train").glob("*.npz"))) == 10 and not (tmp_path / "stages" / "embed.json").exists()
    part = load_embeddings(parts / "train" / "000000.npz")
    save_embeddings(parts / "train" / "000000.npz", {**part, "embeddings": np.zeros_like(part["embeddings"])})
    shard.write_bytes(good)
    run_pipeline("stage=embed", f"run_dir={tmp_path}", *SHARDED)
    assert not parts.exists()
    train = load_embeddings(tmp_path / "embeddings" / "frozen" / "train.npz")
    assert np.all(train["embeddings"][:100] == 0)
    expected = single_process(tmp_path)
    np.testing.assert_allclose(train["embeddings"][100:], expected["train"]["embeddings"][100:], rtol=1e-5, atol=1e-6)
    assert_same_embeddings(load_embeddings(tmp_path / "embeddings" / "frozen" / "test.npz"), expected["test"])


def test_an_export_as_pretrained_is_the_frozen_encoder(digits_run, tmp_path):
    """model.pretrained=<an exported folder> (say, an encoder pretrained on other classes): the frozen
    encoder is that export exactly, head included, whatever the seed; an export of another
    architecture fails in one line before any stage writes."""
    export = digits_run / "export"
    run_pipeline("stage=embed", f"run_dir={tmp_path / 'run'}", *SMALL, "seed=5", f"model.pretrained={export}")
    saved = ModelConfig(**json.loads((export / "config.json").read_text()))
    expected = embed_split(load_exported(export), tmp_path / "run" / "shards" / "test", eval_transform(saved), 64,
                           torch.device("cpu"))
    assert_same_embeddings(load_embeddings(tmp_path / "run" / "embeddings" / "frozen" / "test.npz"), expected)
    bad = run_pipeline("stage=all", f"run_dir={tmp_path / 'bad'}", *SMALL, "model.embed_dim=64",
                       f"model.pretrained={export}", check=False)
    assert bad.returncode == 2 and "exported encoder with embed_dim=32" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
