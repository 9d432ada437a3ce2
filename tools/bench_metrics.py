"""Benchmark of pipeline.metrics.retrieval_metrics against a bare faiss search and pytorch-metric-learning.

    bash tools/env.sh python tools/bench_metrics.py                # SOP's test size, leave-one-out
    bash tools/env.sh python tools/bench_metrics.py --million      # 1,000,000 x 512 gallery

SOP mode: 60,502 synthetic clustered embeddings (512-d, L2-normalised) in 11,316 classes of 2 to
about 12 images (SOP's test split has these counts), SOP's ks 1, 10, 100, 1000. In one run it
times (1) a bare faiss IndexFlatIP built and searched with the same k as retrieval_metrics uses,
(2) retrieval_metrics without NMI (recall@ks, map@r, r_precision), (3) NMI/AMI alone (k-means with
11,316 clusters: a different cost, reported apart), (4) pytorch-metric-learning's
AccuracyCalculator (precision_at_1, MAP@R, R-precision) searching as deep, and prints the ratios.

Million mode: a gallery of 1,000,000 x 512 vectors and --queries distinct queries
(query -> gallery; leave-one-out holds the same gallery and the same chunk buffers, it only has
more queries). Prints time per query, the extrapolated time for 1,000,000 leave-one-out queries,
and the process's peak resident memory (run it in its own process so the peak is its own).
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import faiss
import numpy as np

from pipeline.eval import metrics  # noqa: E402
from pipeline.eval.metrics import retrieval_metrics  # noqa: E402


def class_sizes(rng, n: int, n_classes: int, smallest: int = 2) -> np.ndarray:
    """n images over n_classes classes of at least `smallest`, spread like SOP's (mean ~5.3)."""
    extra = rng.multinomial(n - smallest * n_classes, np.full(n_classes, 1.0 / n_classes))
    return smallest + extra


def clustered(rng, sizes: np.ndarray, dim: int, noise: float = 2.2, block: int = 1 << 16):
    """L2-normalised float32 embeddings around random class centres, built in blocks (no float64 n x dim)."""
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    centres = (rng.standard_normal((len(sizes), dim)) / np.sqrt(dim)).astype(np.float32)
    x = np.empty((len(labels), dim), np.float32)
    for start in range(0, len(labels), block):
        part = centres[labels[start:start + block]]
        part += (noise / np.sqrt(dim)) * rng.standard_normal(part.shape, dtype=np.float32)
        x[start:start + block] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x, labels


def timed(fn):
    """fn's result, its wall time and its CPU time (all threads of this process). On a machine shared
    with other jobs the wall time swings with their load; the CPU time much less."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def bare_search(x: np.ndarray, k: int):
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index.search(x, k)


def pml(x: np.ndarray, labels: np.ndarray, k: int) -> dict:
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
                              avg_of_avgs=False, k=k, device=torch.device("cpu"))
    return calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels), ref_includes_query=True)


def sop(args) -> None:
    rng = np.random.default_rng(0)
    x, labels = clustered(rng, class_sizes(rng, args.n, args.classes), args.dim)
    ks = (1, 10, 100, 1000)
    max_r = int(np.bincount(labels).max()) - 1
    k_search = max(max(ks), max_r) + 1   # what retrieval_metrics searches (self included)
    print(f"{len(x)} x {x.shape[1]}, {args.classes} classes (max {max_r + 1} per class), ks {ks}, "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, k searched {k_search}")
    rows = []
    for rep in range(args.repeats):   # alternated, so a change in the machine's load hits both
        _, bare_wall, bare_cpu = timed(lambda: bare_search(x, k_search))
        ours, wall, cpu = timed(lambda: retrieval_metrics(x, labels, ks=ks, nmi=False))
        rows.append((bare_wall, bare_cpu, wall, cpu))
        print(f"  run {rep}: bare faiss search {bare_wall:.1f} s wall / {bare_cpu:.1f} s CPU; retrieval_metrics "
              f"(no NMI) {wall:.1f} s / {cpu:.1f} s; ratio {wall / bare_wall:.3f} wall, {cpu / bare_cpu:.3f} CPU",
              flush=True)
    if not rows:   # --repeats 0: NMI alone
        return nmi(x, labels)
    print("  metrics:", {k: round(v, 4) if isinstance(v, float) else v for k, v in ours.items()})
    best = np.min(np.array(rows), axis=0)
    print(f"retrieval_metrics / bare faiss, best of {args.repeats}: wall {best[2]:.1f} / {best[0]:.1f} s = "
          f"{best[2] / best[0]:.3f}; CPU {best[3]:.1f} / {best[1]:.1f} s = {best[3] / best[1]:.3f}", flush=True)
    if args.pml:
        theirs, pml_wall, pml_cpu = timed(lambda: pml(x, labels, k_search - 1))
        print(f"AccuracyCalculator (k={k_search - 1}): {pml_wall:.1f} s wall / {pml_cpu:.1f} s CPU; retrieval_metrics / "
              f"AccuracyCalculator = {best[2] / pml_wall:.3f} wall, {best[3] / pml_cpu:.3f} CPU; its precision_at_1 "
              f"{theirs['precision_at_1']:.4f} map@r {theirs['mean_average_precision_at_r']:.4f} "
              f"r_precision {theirs['r_precision']:.4f}", flush=True)
    if args.nmi:
        nmi(x, labels, best[1])
    print(f"peak resident memory {peak_rss_gib():.2f} GiB")


def nmi(x: np.ndarray, labels: np.ndarray, bare_cpu: float | None = None) -> None:
    scores, wall, cpu = timed(lambda: metrics._clustering_scores(x, labels))
    ratio = f" = {cpu / bare_cpu:.2f} x the bare search's CPU" if bare_cpu else ""
    print(f"NMI/AMI alone (faiss k-means++, {len(np.unique(labels))} clusters, {metrics.KMEANS_NITER} iterations): "
          f"{wall:.1f} s wall / {cpu:.1f} s CPU{ratio}; {scores}", flush=True)


def million(args) -> None:
    rng = np.random.default_rng(0)
    n, dim = 1_000_000, args.dim
    sizes = class_sizes(rng, n + args.queries, (n + args.queries) // 5)
    (x, labels), t_gen, _ = timed(lambda: clustered(rng, sizes, dim))
    q, ql, g, gl = x[:args.queries].copy(), labels[:args.queries], x[args.queries:], labels[args.queries:]
    del x
    print(f"gallery {g.shape}, {args.queries} queries, {len(sizes)} classes, generated in {t_gen:.0f} s; "
          f"{faiss.omp_get_max_threads()} threads; resident {peak_rss_gib():.2f} GiB before the metrics")
    m, t, cpu = timed(lambda: retrieval_metrics(q, ql, g, gl, ks=(1, 10, 100, 1000), nmi=False))
    per_query = t / args.queries
    print(f"retrieval_metrics: {t:.1f} s wall ({cpu:.1f} s CPU) for {args.queries} queries ({per_query * 1e3:.2f} ms/query); "
          f"1,000,000 leave-one-out queries on this machine: about {per_query * n / 3600:.1f} h")
    print("  metrics:", {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()})
    print(f"peak resident memory {peak_rss_gib():.2f} GiB (gallery alone {g.nbytes / 2**30:.2f} GiB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=60_502)
    p.add_argument("--classes", type=int, default=11_316)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-pml", dest="pml", action="store_false")
    p.add_argument("--no-nmi", dest="nmi", action="store_false")
    p.add_argument("--million", action="store_true")
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=0, help="faiss/OpenMP threads (0: faiss's default)")
    args = p.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    million(args) if args.million else sop(args)


if __name__ == "__main__":
    main()
