"""What the default test suite costs, and what each costly test covers: from pytest's --durations=0 output.

    REQUIRE_SLURM=1 bash tools/env.sh python -m pytest -q --durations=0 > durations.txt
    python tools/suite_costs.py durations.txt [--top 40]

Prints two Markdown tables for BENCHMARKS.md: the costliest tests (setup + call + teardown) with the area
of the code each covers and the backends or launchers it names, and the total per area. The areas come
from the test files (AREAS); a file not listed there is its own area, so nothing is silently dropped.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

AREAS = {
    "backends (2 processes)": ["test_parallel", "test_precision", "test_resharding", "test_host_memory"],
    "Slurm and launchers": ["test_slurm", "test_slurm_documented", "test_sweep_slurm"],
    "sweeps and studies": ["test_sweep", "test_study_glyphs", "test_study_batch", "test_study_finetuning"],
    "Quick start and docs": ["test_quickstart"],
    "data and converters": ["test_converters", "test_custom_data", "test_fashion_mnist", "test_glyphs", "test_shards",
                            "test_original_images", "test_transforms", "test_epoch_rules"],
    "index, search, serve, ONNX": ["test_search", "test_onnx", "test_export_upstream", "test_search_page", "test_rerank"],
    "faults (resume, lock, disk, soak, trust, preflight, logs)": [
        "test_resume", "test_soak", "test_disk_full", "test_run_lock", "test_trust", "test_preflight", "test_logs"],
    "plan": ["test_plan", "test_accounting"],
    "config and runner": ["test_config", "test_experiment", "test_console", "test_layers"],
    "losses": ["test_recall_at_k", "test_simix", "test_rsk_kernels", "test_split_loss", "test_losses_pipeline",
               "test_losses_two_pass", "test_intra_batch", "test_rho_miner", "test_roth_multisimilarity"],
    "eval": ["test_evaluate", "test_metrics", "test_diagnostics", "test_retrievals", "test_protocols",
             "test_positives_beyond_k", "test_failures"],
    "GPU paths on the CPU": ["test_gpu_paths", "test_faiss_device", "test_gpu_node"],
    "training (step, validation, recipes, tracking)": [
        "test_two_pass", "test_validation", "test_optim", "test_recipes", "test_recipe_selection", "test_tracking",
        "test_pipeline", "test_lora", "test_layer_decay", "test_compile"],
    "encoders": ["test_encoders", "test_full_size", "test_embed", "test_encoder_families", "test_model_check",
                 "test_hub_cache", "test_two_pass_towers"],
}
AREA_OF = {stem: area for area, stems in AREAS.items() for stem in stems}
TAGS = re.compile(r"zero3_offload|zero[123]|fsdp2|ddp|torchrun|accelerate|srun|sbatch|two_node|preempt|kill")
LINE = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s+(\S+)")


def read(path: Path) -> dict[str, float]:
    """test node id -> seconds (setup + call + teardown)."""
    costs: dict[str, float] = defaultdict(float)
    for line in path.read_text().splitlines():
        match = LINE.match(line)
        if match:
            costs[match.group(3)] += float(match.group(1))
    return costs


def area(node: str) -> str:
    stem = Path(node.split("::")[0]).stem
    return AREA_OF.get(stem, stem)


def tables(costs: dict[str, float], top: int) -> str:
    lines = ["| test | s | area | names |", "|---|---:|---|---|"]
    for node, seconds in sorted(costs.items(), key=lambda kv: -kv[1])[:top]:
        tags = ", ".join(dict.fromkeys(TAGS.findall(node.lower())))
        lines.append(f"| `{node}` | {seconds:.1f} | {area(node)} | {tags} |")
    per_area: dict[str, list[float]] = defaultdict(list)
    for node, seconds in costs.items():
        per_area[area(node)].append(seconds)
    lines += ["", "| area | tests | s | share |", "|---|---:|---:|---:|"]
    total = sum(costs.values()) or 1.0
    for name, values in sorted(per_area.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"| {name} | {len(values)} | {sum(values):.0f} | {sum(values) / total:.0%} |")
    lines.append(f"| **all** | {len(costs)} | {total:.0f} | |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("durations", type=Path)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    print(tables(read(args.durations), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
