"""plan/plan.json, plan/plan.md and the printed table."""
from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.plan.estimate import ALLOWANCE_GIB, FRAGMENTATION


def significant(x: float, digits: int = 2) -> str:
    """x to `digits` significant figures, without an exponent: 0.00031, 3.1, 1,200."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    rounded = float(f"{x:.{digits}g}")
    return f"{rounded:,.{max(0, digits - 1 - math.floor(math.log10(abs(rounded))))}f}"


def advice(p: dict) -> str:
    """The chunk to set, where a larger one fits and sends fewer bytes per step."""
    if not p.get("suggested_chunk"):
        return ""
    return f"; set train.chunk_size={p['suggested_chunk']} (it fits, and fewer chunks per step send fewer bytes)"


def verdict(p: dict) -> str:
    """One line: whether it fits, with the figure."""
    head = (f"{p['model']} {p['parallel']} on {p['nodes']}x{p['gpus_per_node']} {p['gpu']}, global batch "
            f"{p['global_batch']}, chunk {p['chunk_size']}")
    largest = (f"largest chunk that fits: {p['largest_chunk']} ({p['largest_chunk_peak_gb']:.1f} GiB)"
               if p["largest_chunk"] else "no chunk fits" if p["searched"] else "largest chunk not searched (plan.search=false)")
    if p["fits"]:
        return f"{head}: fits, {p['peak_gb_per_gpu']:.1f} of {p['gpu_memory_gb']:.1f} GiB per GPU; {largest}{advice(p)}"
    return (f"{head}: does NOT fit, {p['peak_gb_per_gpu']:.1f} GiB per GPU needed, {p['gpu_memory_gb']:.1f} GiB there; "
            f"{largest}{advice(p)}")


def markdown(p: dict) -> str:
    lines = [f"# Plan: {p['model']}, {p['parallel']}, {p['world_size']} x {p['gpu']}", "", verdict(p), "",
             "| memory per GPU at the peak | GiB |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in p["memory_gb"].items()]
    lines += [f"| **total** | **{p['peak_gb_per_gpu']:.2f}** |", f"| GPU memory | {p['gpu_memory_gb']:.1f} |", "",
              "| phase of the step | peak GiB (tracked, whole share) |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in p["phases_gb"].items()]
    lines += ["", "| chunk measured | total GiB per GPU |", "|---:|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in sorted(p["chunks_measured"].items())]
    lines += ["", "| bytes each GPU sends per step | GB |", "|---|---:|"]
    lines += [f"| {k} | {v / 1e9:.3f} |" for k, v in p["bytes_sent_per_gpu"].items()]
    lines += ["", f"- parameters: {p['parameters']:,} ({p['trainable']:,} trainable)",
              f"- FLOPs per step: {p['flops_per_step']:.3e} ({p['flops_per_step_per_gpu']:.3e} per GPU; pass 1, "
              f"the loss, pass 2 with its recomputation, the optimizer; torch.utils.flop_counter)",
              f"- step: {significant(p['step_s'])} s = compute {significant(p['compute_s'])} s at MFU {p['mfu']} of "
              f"{p['peak_tflops']:.0f} TFLOP/s ({p['precision'].get('matmul', 'bf16')}) + communication "
              f"{significant(p['comm_s'])} s at {p['bandwidth_gbps']:.0f} Gbit/s (not overlapped: an upper bound)",
              f"- epoch: {p['steps_per_epoch']} steps of {p['global_batch']} ({p['train_images']:,} images): "
              f"{significant(p['epoch_h'])} h ({significant(p['epoch_h'] * 60)} min), "
              f"{significant(p['gpu_hours_per_epoch'])} GPU-hours",
              f"- allowances: {', '.join(f'{k} {v} GiB' for k, v in ALLOWANCE_GIB.items())}, allocator "
              f"fragmentation {FRAGMENTATION:.0%} of the tracked peak (pipeline/plan/estimate.py says why)",
              f"- simulated on fake tensors in {sum(p['simulation_s']):.0f} s ({len(p['simulation_s'])} chunk sizes, 2 steps each; "
              + (f"{p['blocks_simulated'][0]} and {p['blocks_simulated'][1]} of the {p['blocks']} blocks, extrapolated: "
                 f"pipeline/plan/depth.py)" if p["blocks_simulated"] else "every block)")]
    return "\n".join(lines) + "\n"


def write(p: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.json").write_text(json.dumps(p, indent=2, default=str))
    (folder / "plan.md").write_text(markdown(p))
