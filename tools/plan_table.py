"""BENCHMARKS.md's "What fits where": stage=plan's answer for recipe=rsk data=sop, per model, backend,
cluster (nodes of 8 GPUs) and GPU type: per-GPU peak at the recipe's global batch and chunk, the largest
chunk that fits, the epoch time.

Memory does not depend on the GPU type (only the budget and the times do), so each (model, backend,
world size) is simulated once: every GPU's row is estimate.plan's answer over the same measurements
(its `measured` cache), the chunk search measuring only the chunks a budget asks for.

    bash tools/env.sh python tools/plan_table.py --out runs/plan_table   # table.md and table.json there
    bash tools/env.sh python tools/plan_table.py --models vitl14_clip --backends fsdp2 --nodes 1
    bash tools/env.sh python tools/plan_table.py --render runs/plan_table/table.json   # the table again
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.parallel.shares import check_shares
from pipeline.errors import UserError
from pipeline.plan import estimate, gpus

FALLBACK = ("train.global_batch=4096", "train.chunk_size=32")  # where the recipe's 4000 / 50 do not split


def settings(model: str, backend: str, nodes: int, gpu: str, extra: list[str]) -> list[str]:
    """The plan's overrides: the recipe's global batch and chunk, or FALLBACK where they do not split
    over the world size (check_shares refuses them, as the real run would); `extra` last."""
    base = ["stage=plan", "recipe=rsk", "data=sop", f"model={model}", f"parallel={backend}", f"plan.nodes={nodes}",
            "plan.gpus_per_node=8", f"plan.gpu={gpu}", *extra]
    try:
        check_shares(load_config(base).train, nodes * 8)
        return base
    except UserError:
        return [*base, *FALLBACK]


def row(p: dict) -> str:
    peak = f"{p['peak_gb_per_gpu']:.1f}" + ("" if p["fits"] else " (does not fit)")
    largest = f"{p['largest_chunk']} ({p['largest_chunk_peak_gb']:.1f})" if p["largest_chunk"] else "none fits"
    return (f"| {p['model']} | {p['parallel']} | {p['nodes']}x{p['gpus_per_node']} | {p['gpu']} | {p['global_batch']} / "
            f"{p['chunk_size']} | {peak} | {largest} | {p['epoch_h'] * 3600:.0f} | {p['gpu_hours_per_epoch']:.2f} |")


HEADER = ["| model | backend | GPUs | GPU | global batch / chunk | peak GiB per GPU | largest chunk (its GiB) | "
          "epoch s (SOP) | GPU-h per epoch |", "|---|---|---|---|---|---:|---|---:|---:|"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vitl14_clip", "vitg14_clip"])
    ap.add_argument("--backends", nargs="+", default=["fsdp2", "zero3"])
    ap.add_argument("--nodes", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--gpus", nargs="+", default=list(gpus.GPUS))
    ap.add_argument("--set", nargs="*", default=[], help="more key=value settings, e.g. train.precision=bf16")
    ap.add_argument("--out", type=Path, default=Path("runs/plan_table"))
    ap.add_argument("--render", type=Path, help="print the table of a table.json written before; simulate nothing")
    args = ap.parse_args()
    if args.render:
        print("\n".join([*HEADER, *map(row, json.loads(args.render.read_text()))]))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    plans, lines = [], list(HEADER)
    for model in args.models:
        for backend in args.backends:
            for nodes in args.nodes:
                tic, measured = time.perf_counter(), {}  # one simulation cache per (model, backend, world size)
                for gpu in args.gpus:
                    p = estimate.plan(load_config(settings(model, backend, nodes, gpu, args.set)), log=lambda _: None,
                                      measured=measured)
                    plans.append(p)
                    lines.append(row(p))
                    print(lines[-1], flush=True)
                print(f"  {model} {backend} {nodes}x8: chunks {sorted(measured)} simulated, "
                      f"{time.perf_counter() - tic:.0f} s", flush=True)
                (args.out / "table.md").write_text("\n".join(lines) + "\n")
                (args.out / "table.json").write_text(json.dumps(plans, indent=1, default=str))


if __name__ == "__main__":
    main()
