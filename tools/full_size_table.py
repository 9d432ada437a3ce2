"""The full-size steps' figures as BENCHMARKS.md's table: one row per line of the FULL_SIZE_LOG that
tests/test_full_size.py writes (tools/slow_suite.sh sets it to OUT/full_size.jsonl).

    python tools/full_size_table.py runs/slow/full_size.jsonl > runs/slow/full_size.md

Columns: preset, backend and processes; build and step time; seconds per image of the global batch;
the largest per-rank peak RSS after the build and during the step; the executed FLOP/s per process
against a bare fp32 matmul timed in the same process just before the step (their ratio: how much of
the machine's matmul rate the step reaches); the update error against the one-process reference
(worst tensor / all tensors; worst block tensor where the worker compared the blocks among themselves).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def row(r: dict) -> str:
    block = f" / blocks {r['max_block_update_error']:.1e}" if r.get("max_block_update_error") is not None else ""
    return (f"| {r['preset']} | {r['parallel']} x {r['processes']} | {r['build_s']} s | {r['step_s']} s | "
            f"{r['s_per_image']} | {max(r['built_peak_rss_gb_per_rank']):.2f} / "
            f"{max(r['step_peak_rss_gb_per_rank']):.2f} GB | {r['achieved_gflops_per_process']:.1f} / "
            f"{r['machine_matmul_gflops_per_process']:.1f} GFLOP/s ({r['fraction_of_machine_matmul']:.2f}) | "
            f"{r['max_update_error']:.1e} / {r['total_update_error']:.1e}{block} |")


def table(lines: list[dict]) -> str:
    head = ["| preset | backend x processes | build | step | s/image | peak RSS per rank, built / step | "
            "achieved / machine matmul per process (fraction) | update error: worst tensor / all |",
            "|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + [row(r) for r in lines]) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_file():
        print("usage: python tools/full_size_table.py FULL_SIZE_LOG (a file of JSON lines from tests/test_full_size.py)",
              file=sys.stderr)
        return 2
    records = [json.loads(line) for line in Path(argv[0]).read_text().splitlines() if line.strip()]
    sys.stdout.write(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
