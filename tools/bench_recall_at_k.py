"""RS@k at B = 4,000: the vectorised, chunked loss vs a per-query loop in the authors' style; peak memory.

Speed: forward + backward of `RecallAtK` over the whole batch, against the loss called once per
query as the authors' released code does (for each query, the (B x B) matrix of sigmoid
differences between every pair of database items, then backward), in the same run. The loop
runs on --loop-queries queries and is scaled to B (each query costs the same); its loss on those
queries is checked to equal the vectorised loss restricted to them.

Memory: each case runs in a fresh subprocess that builds its inputs, records its resident set
size (RSS), runs forward + backward, and reports the peak RSS (getrusage ru_maxrss) and the peak
minus the RSS before the loss (what the loss itself added, at most).

    bash tools/env.sh python tools/bench_recall_at_k.py [--batch 4000] [--dim 512] [--loop-queries 100]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.losses import RecallAtK, RecallAtKSiMix, recall_at_k_loss, set_step  # noqa: E402

KS, TAU_RANK, TAU_COUNT = (1, 2, 4, 8, 16), 0.01, 1.0


def inputs(batch: int, dim: int, per_class: int, seed: int = 0):
    """Embeddings around one random centre per class (noise 1.5x the centre), so that ranks and the
    loss are far from their values on pure noise (loss ~1) and the loop/vectorised check means something."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch // per_class).repeat_interleave(per_class)[torch.randperm(batch, generator=g)]
    centres = torch.randn(batch // per_class, dim, generator=g)
    return F.normalize(centres[labels] + 1.5 * torch.randn(batch, dim, generator=g), dim=1), labels


def authors_style_query_loss(emb: torch.Tensor, labels: torch.Tensor, q: int) -> torch.Tensor:
    """RS@k of one query: the (B x B) sigmoid-difference matrix over all database items."""
    b = len(labels)
    sim = emb[q] @ emb.T                                            # (B,)
    diff = sim[None, :] - sim[:, None]                              # [p, z] = s_qz - s_qp
    mask = ~torch.eye(b, dtype=torch.bool)                          # z != p
    mask[:, q] = False                                              # z != q
    rank = 1 + (torch.sigmoid(diff / TAU_RANK) * mask).sum(1)       # rank of every item p
    pos = labels == labels[q]
    pos[q] = False
    n_pos = int(pos.sum())
    recalls = []
    for k in KS:
        k = min(k, b - 1)
        count = torch.sigmoid((k - rank[pos]) / TAU_COUNT).sum()
        recalls.append(torch.clamp(count, max=k) / min(k, n_pos))
    return 1 - torch.stack(recalls).mean()


def time_vectorised(emb, labels, repeats: int) -> tuple[float, float]:
    loss_fn = RecallAtK(KS, TAU_RANK, TAU_COUNT)
    times = []
    for _ in range(repeats):
        e = emb.clone().requires_grad_()
        tic = time.perf_counter()
        loss = loss_fn(e, labels)
        loss.backward()
        times.append(time.perf_counter() - tic)
    return min(times), loss.item()


def time_loop(emb, labels, queries: int) -> tuple[float, float, torch.Tensor]:
    e = emb.clone().requires_grad_()
    total = 0.0
    tic = time.perf_counter()
    for q in range(queries):
        loss = authors_style_query_loss(e, labels, q) / queries
        loss.backward()
        total += loss.item()
    return time.perf_counter() - tic, total, e.grad


def memory_child(case: str, batch: int, dim: int, per_class: int) -> None:
    emb, labels = inputs(batch, dim, per_class)
    emb.requires_grad_()
    if case == "rsk":
        loss_fn, total = RecallAtK(KS, TAU_RANK, TAU_COUNT), batch
    else:
        loss_fn = RecallAtKSiMix(KS, TAU_RANK, TAU_COUNT, per_class=0, seed=0)
        set_step(loss_fn, 0)
        total = batch + batch // per_class * per_class * (per_class - 1) // 2
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    loss_fn(emb, labels).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"case": case, "batch": batch, "rows": total, "peak_mib": peak / 1024,
                      "added_mib": (peak - max(rss_before, 0)) / 1024, "peak_before_mib": before / 1024}))


def measure_memory(case: str, batch: int, dim: int, per_class: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", case, "--batch", str(batch), "--dim", str(dim),
                          "--per-class", str(per_class)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--loop-queries", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-child", choices=["rsk", "rsk_simix"])
    a = parser.parse_args()
    if a.memory_child:
        return memory_child(a.memory_child, a.batch, a.dim, a.per_class)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={a.batch}, D={a.dim}, "
          f"{a.per_class} per class", flush=True)
    emb, labels = inputs(a.batch, a.dim, a.per_class)
    small = inputs(64, a.dim, a.per_class)
    time_vectorised(*small, 1), time_loop(*small, 1)  # warm-up: first calls pay one-off set-up costs
    vec, _ = time_vectorised(emb, labels, a.repeats)
    print(f"vectorised RS@k fwd+bwd: {vec:.2f} s (best of {a.repeats})", flush=True)
    loop, loop_loss, loop_grad = time_loop(emb, labels, a.loop_queries)
    scaled = loop * a.batch / a.loop_queries
    print(f"per-query loop: {loop:.2f} s for {a.loop_queries} queries -> {scaled:.0f} s for {a.batch}", flush=True)
    e = emb.clone().requires_grad_()
    subset = recall_at_k_loss(e @ e.T, labels, KS, TAU_RANK, TAU_COUNT, query_mask=torch.arange(a.batch) < a.loop_queries)
    subset.backward()
    grad_err = ((e.grad - loop_grad).norm() / loop_grad.norm()).item()
    print(f"same loss on those queries: loop {loop_loss:.6f}, vectorised {subset.item():.6f}; "
          f"relative gradient difference {grad_err:.1e}", flush=True)
    assert abs(loop_loss - subset.item()) < 1e-5 and grad_err < 1e-3, "the loop and the vectorised loss disagree"
    print(f"speed-up: {scaled / vec:.0f}x", flush=True)
    for case, batch in (("rsk", a.batch), ("rsk_simix", a.batch)):
        m = measure_memory(case, batch, a.dim, a.per_class)
        print(f"memory {case}: {m['rows']} rows (B={m['batch']}{' + SiMix' if case != 'rsk' else ''}): "
              f"peak RSS {m['peak_mib']:.0f} MiB, added by the loss {m['added_mib']:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
