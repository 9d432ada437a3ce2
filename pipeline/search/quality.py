"""How good and how fast an index is, on held-out queries: index/report.json.

The queries are a seeded sample of gallery items, searched leave-one-out (the item itself is dropped
from its own results, as the eval protocol does), so the measure needs no second dataset.
recall@k = |approximate top-k  intersect  exact top-k| / k, averaged over the queries (exact: a flat
inner-product search over the same float vectors). Latency is one query at a time on one thread,
through the same `search` the Searcher and the HTTP service call (re-ranking included).
"""
from __future__ import annotations

import time
from typing import Callable

import faiss
import numpy as np

from pipeline.models import accounting

KS = (1, 10, 100)
LATENCY_QUERIES = 1000


def exact_neighbours(vectors: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """The exact top-k gallery ids of each gallery row in `rows`, leaving the row itself out."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    for start in range(0, len(vectors), 65536):
        flat.add(np.ascontiguousarray(vectors[start:start + 65536], dtype=np.float32))
    return leave_one_out(flat.search, vectors, rows, k)


def leave_one_out(search: Callable, vectors: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """search(queries, k + 1) for the gallery rows `rows`, each row's own id removed, k ids kept."""
    queries = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    _, ids = search(queries, k + 1)
    own = ids == rows[:, None]
    keep = np.where(own.any(axis=1, keepdims=True), ~own, np.arange(ids.shape[1]) < k)  # own id absent: first k
    return ids[keep].reshape(len(rows), k)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:, :k] & truth[:, :k]| / k."""
    hits = [len(np.intersect1d(f[:k], t[:k])) for f, t in zip(found, truth)]
    return float(np.mean(hits) / k)


def measure(search: Callable, vectors: np.ndarray, rows: np.ndarray) -> dict:
    """recall@1/10/100 against exact, single-query latency on one thread, batch throughput."""
    ks = [k for k in KS if k < len(vectors)]
    truth = exact_neighbours(vectors, rows, max(ks))
    # each k searched as a user asks for k results (the re-ranked shortlist grows with k)
    report = {f"recall@{k}": recall_at(leave_one_out(search, vectors, rows, k), truth, k) for k in ks}
    report["queries"] = len(rows)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        times = []
        for row in rows[:LATENCY_QUERIES]:
            query = np.ascontiguousarray(vectors[row:row + 1], dtype=np.float32)
            start = time.perf_counter()
            search(query, 10)
            times.append(time.perf_counter() - start)
    finally:
        faiss.omp_set_num_threads(threads)
    report["latency_ms"] = {"p50": 1e3 * float(np.percentile(times, 50)), "p99": 1e3 * float(np.percentile(times, 99)),
                            "threads": 1, "k": 10}
    queries = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    start = time.perf_counter()
    search(queries, 10)
    report["throughput_qps"] = {"value": len(rows) / (time.perf_counter() - start), "threads": threads, "k": 10}
    return report


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, GiB."""
    return accounting.high_water_kib() / 2**20


def index_bytes(index: faiss.Index) -> int:
    """The index's size as faiss serialises it: what it holds in RAM, to within its small headers."""
    return int(faiss.serialize_index(index).size)
