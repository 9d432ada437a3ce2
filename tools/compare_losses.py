"""The fair comparison of the losses (Roth et al.'s protocol) on Fashion-MNIST's open-set split.

Same encoder (tiny ViT, random init, seed 0), same steps, batch, sampler (P x K, seed 0),
augmentation and optimizer for every loss; only `loss=<preset>` changes. The data is sharded and
the frozen baseline embedded once; each loss then gets its own run directory holding copies of
those artifacts (and their completion markers, so the runner skips them) and runs
finetune -> export -> eval through the pipeline's CLI. Writes a recall@1 / MAP@R table into
BENCHMARKS.md between the markers below (replacing the previous table).

    bash tools/env.sh python tools/compare_losses.py [--steps 100] [--batch 128] [--losses rsk triplet ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOSSES = ["rsk", "rsk_simix", "contrastive", "triplet", "margin", "margin_rho", "multi_similarity", "lifted",
          "proxy_anchor", "normalized_softmax", "arcface", "mpn"]
# With 5 training classes a batch of 128 holds ~25 images per class, ~300 same-class pairs each:
# SiMix on every pair would make the RS@k loss cost more than the encoder on 2 cores.
EXTRA = {"rsk_simix": ["loss.simix_per_class=50"]}
BEGIN, END = "<!-- compare_losses: begin -->", "<!-- compare_losses: end -->"


def run(args: list[str]) -> float:
    tic = time.perf_counter()
    # One thread by default: on the shared 2-core machine, 2 threads per run trained ~10x slower (oversubscription).
    proc = subprocess.run([sys.executable, str(REPO / "pipeline" / "run.py"), *args], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode != 0:
        raise SystemExit(f"run.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - tic


def prepare(base: Path, run_dir: Path) -> None:
    """A fresh run directory that already holds the shared shards and frozen embeddings."""
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "stages").mkdir(parents=True)
    for stage in ("shard", "embed"):
        shutil.copy(base / "stages" / f"{stage}.json", run_dir / "stages")
    shutil.copytree(base / "shards", run_dir / "shards")
    shutil.copytree(base / "embeddings", run_dir / "embeddings")


def table(rows: list[dict], frozen: dict) -> str:
    lines = ["| loss | recall@1 | recall@2 | recall@4 | map@r | minutes |", "|---|---|---|---|---|---|",
             f"| frozen (random init, no training) | {frozen['recall@1']:.4f} | {frozen['recall@2']:.4f} | "
             f"{frozen['recall@4']:.4f} | {frozen['map@r']:.4f} | |"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| `{' '.join(['loss=' + r['loss'], *EXTRA.get(r['loss'], [])])}` | {m['recall@1']:.4f} | {m['recall@2']:.4f} | {m['recall@4']:.4f} | "
                     f"{m['map@r']:.4f} | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def write_benchmarks(text: str) -> None:
    path = REPO / "BENCHMARKS.md"
    doc = path.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/compare_losses", help="run directories go here")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--depth", type=int, default=2, help="transformer blocks of the tiny ViT")
    parser.add_argument("--losses", nargs="+", default=LOSSES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    a = parser.parse_args()
    root = (REPO / a.root).resolve()
    common = ["data=fashion_mnist", f"model.depth={a.depth}", f"seed={a.seed}", f"train.max_steps={a.steps}", f"train.global_batch={a.batch}",
              "train.chunk_size=64", "train.samples_per_class=4", f"train.checkpoint_every={a.steps}",
              "train.warmup_steps=10", "eval.nmi=false", "eval.batch_size=512"]
    tic = time.perf_counter()
    base = root / "base"
    seconds = run(["stage=embed", f"run_dir={base}", *common])
    print(f"shard + frozen embedding: {seconds:.0f} s", flush=True)
    rows = []
    for loss in a.losses:
        run_dir = root / loss
        prepare(base, run_dir)
        seconds = run(["stage=eval", f"run_dir={run_dir}", f"loss={loss}", *EXTRA.get(loss, []), *common])
        metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
        rows.append({"loss": loss, "metrics": metrics["finetuned"], "seconds": seconds})
        print(f"{loss:<20} recall@1 {metrics['finetuned']['recall@1']:.4f}  map@r {metrics['finetuned']['map@r']:.4f}"
              f"  ({seconds:.0f} s)", flush=True)
    frozen = json.loads((root / a.losses[0] / "eval" / "metrics.json").read_text())["frozen"]
    total = (time.perf_counter() - tic) / 60
    command = "bash tools/env.sh python tools/compare_losses.py " + " ".join(sys.argv[1:])
    text = (f"Command: `{command.strip()}` ({total:.0f} minutes in all; machine: {platform.machine()}, "
            f"{os.cpu_count()} cores, {platform.python_version()}, no GPU; date {time.strftime('%Y-%m-%d', time.gmtime())}).\n"
            f"Every loss: tiny ViT ({a.depth} blocks, random init, seed {a.seed}), {a.steps} steps of {a.batch} images "
            f"(P x K sampler, K = 4, seed {a.seed}), same augmentation and AdamW schedule; "
            f"test: classes 5-9 of the test set, leave-one-out, exact kNN.\n\n{table(rows, frozen)}")
    print(text)
    if not a.no_write:
        write_benchmarks(text)


if __name__ == "__main__":
    main()
