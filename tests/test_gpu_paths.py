"""The GPU paths a first GPU run takes, tested as far as a CPU allows (issue 26): the Triton fallback,
faiss on the process's own GPU, the uint8 batch normalised on the device, torch.cuda.set_device for
one process, the peak-FLOP/s table, attention dropout."""
import logging
import sys
import types

import numpy as np
import pytest
import torch

from pipeline.data.loader import _PerBatchTail
from pipeline.parallel import distributed
from pipeline.errors import UserError
from pipeline.eval import faiss_device, metrics
from pipeline.losses import recall_at_k
from pipeline.models.accounting import peak_flops_of


def test_triton_auto_falls_back_after_one_failed_launch(monkeypatch, caplog):
    """No C compiler on the node: the tiny launch fails, auto picks torch, with one warning line, once."""
    calls = []

    def no_compiler(*args):
        calls.append(args)
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.\nmore")

    fake = types.SimpleNamespace(smooth_ranks=no_compiler)
    import pipeline.losses

    monkeypatch.setitem(sys.modules, "pipeline.losses.rsk_triton", fake)
    monkeypatch.setattr(pipeline.losses, "rsk_triton", fake, raising=False)
    monkeypatch.setattr(recall_at_k, "_launches", {})
    monkeypatch.setattr(torch, "zeros", lambda *shape, device=None: torch.empty(*shape).zero_())  # no CUDA here
    monkeypatch.setattr(torch, "ones", lambda *shape, dtype=None, device=None: torch.empty(*shape, dtype=dtype).fill_(1))
    with caplog.at_level(logging.WARNING):
        assert recall_at_k.pick_kernel("auto", torch.device("cuda", 0)) == "torch"
        assert recall_at_k.pick_kernel("auto", torch.device("cuda", 0)) == "torch"
    assert len(calls) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["train.rsk_kernel=auto: Triton cannot launch on cuda:0 (RuntimeError: Failed to find C "
                        "compiler. Please specify via CC environment variable.); using the torch kernel"]
    assert recall_at_k.pick_kernel("triton", torch.device("cuda", 0)) == "triton"  # asked for: not overridden


def test_faiss_uses_the_process_own_gpu(monkeypatch, tmp_path):
    """A faiss GPU build on a node of 4 GPUs, this rank on GPU 2: the search index and k-means go to
    GPU 2 alone, never to every GPU."""
    moved = []

    def to_gpu(resources, device, index):
        moved.append((type(index).__name__, device))
        return index  # stays a CPU index: the test machine has no GPU

    monkeypatch.setattr(metrics.faiss, "get_num_gpus", lambda: 4)
    monkeypatch.setattr(metrics.faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(metrics.faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(metrics.faiss, "index_cpu_to_all_gpus", lambda *a, **k: pytest.fail("all GPUs"), raising=False)
    monkeypatch.setattr(metrics, "_gpu_resources", {})
    monkeypatch.setattr(faiss_device, "probe", lambda device: None)  # the tiny search in a child worked
    monkeypatch.setattr(faiss_device, "device_key", lambda device: f"GPU {device}")
    monkeypatch.setattr(faiss_device, "_verdicts", {})
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((40, 8)).astype(np.float32), np.repeat(np.arange(4), 10)
    out = metrics.retrieval_metrics(x, labels, ks=(1,), nmi=True)
    assert 0 <= out["recall@1"] <= 1 and "nmi" in out
    assert moved == [("IndexFlatIP", 2), ("IndexFlatL2", 2)]
    assert list(metrics._gpu_resources) == [2]


def test_uint8_batch_is_normalised_on_the_device():
    """The tail (ToDtype + Normalize) gets the uint8 batch already on the device (the meta device
    stands in for a GPU here): the copy is 4x smaller, and the arithmetic runs there."""
    from torchvision.transforms import v2 as T

    seen = []
    tail = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize([0.5] * 3, [0.25] * 3)])

    def recording(images):
        seen.append((images.dtype, images.device.type))
        return tail(images)

    batch = [(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), torch.tensor([0, 1]))]
    (images, labels), = _PerBatchTail(batch, recording, torch.device("meta"))
    assert seen == [(torch.uint8, "meta")] and images.device.type == "meta" and images.dtype == torch.float32
    assert labels.device.type == "meta"
    (images, _), = _PerBatchTail(batch, tail)  # the CPU, as before
    assert torch.allclose(images, torch.full((2, 3, 4, 4), 2.0))


def test_set_device_for_one_process_too(monkeypatch):
    """One process with LOCAL_RANK 1: the current CUDA device is the rank's, as with several."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    distributed.init(distributed.World(rank=0, size=1, local_rank=1), torch.device("cuda", 1))
    assert chosen == [torch.device("cuda", 1)]
    distributed.init(distributed.World(), torch.device("cpu"))
    assert chosen == [torch.device("cuda", 1)]


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA L40", 181), ("NVIDIA L40S", 362), ("NVIDIA L4", 121), ("NVIDIA B200", 2250), ("NVIDIA GB200", 2500),
    ("Tesla T4", 0)])
def test_peak_flops_of_real_device_names(name, tflops):
    """torch.cuda.get_device_name strings: the longest table name contained wins (L40 is not an L4)."""
    assert peak_flops_of(name) == tflops * 1e12


def test_attention_dropout_refused():
    """Attention dropout may take another attention kernel with and without gradients (pass 1 and
    pass 2 of the two-pass step), whose masks differ: a transformers config asking for it is refused."""
    from pipeline.config import ModelConfig
    from pipeline.models.encoders import build_encoder

    cfg = ModelConfig(family="transformers", arch="CLIPVisionModel", depth=1, width=32, heads=2, patch_size=8,
                      image_size=16, embed_dim=8)
    build_encoder(cfg, 0, saved_config={"image_size": 16, "attention_dropout": 0.0})
    with pytest.raises(UserError, match="the model's config sets attention_dropout=0.1: attention dropout draws"):
        build_encoder(cfg, 0, saved_config={"image_size": 16, "attention_dropout": 0.1})
