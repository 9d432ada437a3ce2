"""Step-time and memory accounting: FLOPs per image against a count by hand, MFU, the peak table, the timers."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ModelConfig, load_config
from pipeline.models.accounting import flops_per_image, mfu, peak_flops, peak_flops_of, peak_memory_gb
from pipeline.train.timing import NO_TIMER, PhaseTimer


def vit_matmul_flops(cfg: ModelConfig, width=192, mlp=768) -> dict:
    """Forward FLOPs of the tiny preset's ViT per image, by hand: 2 x multiply-adds of every matmul
    (the patch convolution, q/k/v, the attention scores and their product with v, the projection,
    the MLP) and of the head's Linear; elementwise work is not counted (nor by torch's counter)."""
    patches = (cfg.image_size // cfg.patch_size) ** 2
    tokens = patches + 1  # the class token
    conv = 2 * patches * (3 * cfg.patch_size ** 2) * width
    block = 2 * tokens * width * (3 * width + width + 2 * mlp) + 2 * 2 * tokens * tokens * width
    head = 2 * width * cfg.embed_dim  # on the pooled class token only
    return {"conv": conv, "blocks": cfg.depth * block, "head": head}


def test_flops_per_image_match_a_count_by_hand():
    cfg = load_config([]).model  # the tiny preset: 32 px, patch 8, 4 blocks, width 192
    f = vit_matmul_flops(cfg)
    forward = sum(f.values())
    # Backward: twice the forward for every matmul (gradients of both operands), except the patch
    # convolution, whose input (the images) needs none: its weight gradient only.
    assert flops_per_image(cfg, chunk_size=4) == 3 * forward - f["conv"]
    # Only the head trains: the forward, then the head's Linear backward (both operands: its input
    # gradient reaches the head's LayerNorm weights).
    head_only = dataclasses.replace(cfg, trainable_blocks=0)
    assert flops_per_image(head_only, chunk_size=4) == forward + 2 * f["head"]
    # Activation checkpointing recomputes forwards: not model FLOPs, so not counted.
    assert flops_per_image(dataclasses.replace(cfg, grad_checkpointing=True), 4) == 3 * forward - f["conv"]


def test_mfu_and_the_peak_table():
    assert mfu(1e9, 1000.0, 2, 1e12) == pytest.approx(0.5)
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_of("NVIDIA H200") == 989e12
    assert peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_of("Tesla T4") == 0.0
    assert peak_flops_of("NVIDIA H100 80GB HBM3", "tf32") == 494.5e12  # the data sheet's 989 "with sparsity", halved
    assert peak_flops_of("NVIDIA H100 80GB HBM3", "fp32") == 67e12     # CUDA cores: torch's fp32 without TF32
    assert peak_flops_of("NVIDIA A100-SXM4-80GB", "tf32") == 156e12 and peak_flops_of("NVIDIA L40", "fp32") == 90.5e12
    assert peak_flops(torch.device("cpu")) == 0.0  # no MFU on the CPU unless train.peak_tflops says so
    assert peak_flops(torch.device("cpu"), peak_tflops=2.5) == 2.5e12


def test_peak_memory_is_the_resident_peak_on_the_cpu():
    """The peak is at least what the process holds now, and no more than the machine has (a KiB
    read as bytes, or the reverse, fails one of the two)."""
    import psutil

    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak = peak_memory_gb(torch.device("cpu")) * 1e9
    # ru_maxrss trails the resident size by a few pages; a unit slip is a factor 1024
    assert 0.9 * psutil.Process().memory_info().rss <= peak <= psutil.virtual_memory().total
    del block


def test_a_reset_peak_counts_from_the_present():
    """A 256 MiB block freed before the reset is in the peak before it and not after (in a fresh
    process: the suite's own peak would hide it)."""
    script = ("import torch; from pipeline.models.accounting import peak_memory_gb, reset_peak_memory\n"
              "cpu = torch.device('cpu'); reset_peak_memory(cpu); base = peak_memory_gb(cpu)\n"
              "block = torch.ones(256 * 2**20 // 4); del block\n"
              "before = peak_memory_gb(cpu); assert reset_peak_memory(cpu)\n"
              "print(before - base, peak_memory_gb(cpu) - base)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[1])).stdout.split()
    grew, after_reset = map(float, out)
    assert grew > 0.25 and after_reset < 0.1, (grew, after_reset)


def test_phase_timer_charges_each_phase_and_resets():
    timer = PhaseTimer(torch.device("cpu"))
    with timer.phase("pass1"):
        sum(range(10000))
    with timer.phase("pass1"):
        pass
    items = list(timer.iterate(iter([1, 2, 3]), "data"))
    seconds = timer.take()
    assert items == [1, 2, 3] and set(seconds) == {"pass1", "data"} and all(v >= 0 for v in seconds.values())
    assert timer.take() == {}
    with NO_TIMER.phase("anything"):
        pass
