"""What a training run costs: peak memory, the model's FLOPs per image, and model FLOPs utilisation.

    mem/peak_gb   GPU: torch.cuda.max_memory_allocated (the caching allocator's peak of live tensors);
                  CPU: the process's peak resident set (Linux's VmHWM); 1 GB = 1e9 bytes.
    perf/mfu      (GPU only) flops_per_image * images/s / (processes * the device's peak FLOP/s in the precision
                  its matmuls run in: bf16, TF32 or fp32, pipeline/parallel/precision.py's matmul_precision)

MFU follows the usual definition (PaLM, Chowdhery et al. 2022, appendix B; torchtitan): the model's
forward and backward once per image. The two-pass step also runs a forward without gradients (pass
1), and activation checkpointing recomputes forwards: that is the price of its memory savings, not
model FLOPs, so a two-pass step's MFU is at most about 3/4 of the hardware's utilisation (3/5 with
activation checkpointing).
"""
from __future__ import annotations

import dataclasses
import logging
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import ModelConfig

log = logging.getLogger(__name__)

# Dense peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets, per precision of the matmuls (a run's
# precision: pipeline/parallel/precision.py's matmul_precision): bf16 and TF32 on the tensor cores, plain
# fp32 on the CUDA cores (torch's default for fp32 matmuls without train.tf32). bf16 as torchtitan's
# get_peak_flops has it; the sheets print TF32 and bf16 "with sparsity", twice these. B200 and GB200: the
# HGX B200 / GB200 NVL72 sheets' totals per GPU. The first name contained in the device's name wins, so
# variants come first.
#                    name        bf16    tf32    fp32
PEAK_TFLOPS = (("H100 NVL", (835.0, 417.5, 60.0)), ("H100 PCIe", (756.0, 378.0, 51.0)),
               ("H100", (989.0, 494.5, 67.0)), ("H200", (989.0, 494.5, 67.0)), ("GH200", (989.0, 494.5, 67.0)),
               ("B200", (2250.0, 1125.0, 75.0)), ("GB200", (2500.0, 1250.0, 80.0)),
               ("A100", (312.0, 156.0, 19.5)), ("L40S", (362.0, 183.0, 91.6)), ("L40", (181.0, 90.5, 90.5)),
               ("L4", (121.0, 60.0, 30.3)))
PRECISION_COLUMN = {"bf16": 0, "tf32": 1, "fp32": 2}


def parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all the model's parameters, those that train): the latter carry gradients and optimizer state."""
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return high_water_kib() * 1024 / 1e9


def high_water_kib() -> int:
    """This process's peak resident set in KiB: Linux's VmHWM, which is this address space's own;
    ru_maxrss (the fallback elsewhere) also keeps the peak of the process image before exec, which
    for a subprocess is its parent's size at the fork (a 0.25 GB block measured as 0.03 GB in a
    child of a 0.76 GB pytest)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux and BSD report KiB (macOS bytes)


def reset_peak_memory(device: torch.device) -> bool:
    """Start peak_memory_gb afresh from the present (a phase's own peak). CPU: Linux's
    /proc/self/clear_refs "5" resets VmHWM. False where the system offers no reset (the peak then
    still counts from the process's start)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def flops_per_image(cfg: ModelConfig, chunk_size: int) -> float:
    """The model's training FLOPs per image (one forward and one backward of the trainable part),
    counted by torch.utils.flop_counter on one chunk of a copy built on the meta device: no memory,
    no compute, no weights read. Frozen layers get no weight gradients, and their FLOPs say so;
    activation checkpointing is left out (recomputation is not model FLOPs)."""
    cfg = dataclasses.replace(cfg, pretrained=None, grad_checkpointing=False)
    from pipeline.models.encoders import (
        build_encoder,  # here: encoders pulls in the model libraries
    )

    with torch.device("meta"):
        model = build_encoder(cfg, seed=0).train()
        images = torch.empty(chunk_size, 3, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    return counter.get_total_flops() / chunk_size


def peak_flops(device: torch.device, peak_tflops: float = 0.0, matmul: str = "bf16") -> float:
    """One device's peak FLOP/s in the matmul precision `matmul` (bf16, tf32, fp32): train.peak_tflops if
    set, else the table above; 0 if unknown."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    peak = peak_flops_of(name, matmul)
    if not peak:
        log.warning("perf/mfu is not logged: the peak FLOP/s of %s is unknown; set train.peak_tflops", name)
    return peak


def peak_flops_of(device_name: str, matmul: str = "bf16") -> float:
    """The table's peak FLOP/s in `matmul` precision for a CUDA device name; 0 if it is not there. The
    longest name that the device's contains wins, so "NVIDIA L40" is not an L4, nor "NVIDIA GB200" a B200."""
    by_length = sorted(PEAK_TFLOPS, key=lambda entry: -len(entry[0]))
    return next((peaks[PRECISION_COLUMN[matmul]] * 1e12 for key, peaks in by_length if key in device_name), 0.0)


def two_pass_flops(cfg: ModelConfig, chunk_size: int, images: int) -> float:
    """The FLOPs a two-pass step executes on `images`: pass 1's forward, pass 2's forward and backward,
    and with activation checkpointing the recomputed forward: 5/3 of the model FLOPs, 4/3 without."""
    return flops_per_image(cfg, chunk_size) * images * (5 / 3 if cfg.grad_checkpointing else 4 / 3)


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 3) -> float:
    """This process's measured FLOP/s on an n x n matmul (median of `repeats`, after one warm-up), with
    its own threads: the machine's attainable rate where no data-sheet peak applies (a CPU)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - tic)
    return 2 * n**3 / statistics.median(times)


def mfu(flops_per_image: float, images_per_s: float, processes: int, peak: float) -> float:
    """Model FLOPs utilisation of `processes` devices of peak FLOP/s `peak` processing images_per_s."""
    return flops_per_image * images_per_s / (processes * peak)
