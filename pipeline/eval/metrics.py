"""Retrieval metrics of the deep-metric-learning protocol, with exact faiss search.

    m = retrieval_metrics(query, query_labels)                     # leave-one-out: CUB, Cars, SOP
    m = retrieval_metrics(query, query_labels, gallery, gallery_labels)  # query -> gallery: In-Shop

Embeddings are compared by exact inner product (faiss.IndexFlatIP). They are NOT normalised here:
pass L2-normalised embeddings to get cosine similarity.

For a query, R is the number of gallery items with its label (in leave-one-out, not counting the
query itself, which is removed from its own neighbour list by index). Queries with R == 0 are left
out of every retrieval metric and counted in "num_excluded"; "num_queries" counts those scored.

    recall@k     fraction of queries with a relevant item among their k nearest neighbours
    map@r        mean over queries of (1/R) sum_{i<=R} precision@i * rel(i) (Musgrave et al. 2020)
    r_precision  mean over queries of (relevant items among the top R) / R
    nmi, ami     seeded faiss k-means (k-means++ init where faiss has it) on the query embeddings,
                 one cluster per query label, scored against the query labels; only when nmi=True

If every query is excluded the retrieval metrics are NaN. A k larger than the gallery (less the
query itself) sees the whole gallery.

Scale: faiss holds a float32 copy of the gallery (n x dim); queries are searched CHUNK_ROWS at a
time (fewer when k is large), so the working memory is chunk x k, never n x n. Search and k-means
run on the GPU when this faiss build sees one (faiss-gpu) and a probe on it in a child process has
worked (pipeline/eval/faiss_device.py: a build without code for the GPU aborts the process), on the CPU
otherwise (with as many threads as torch has), and fall back to the CPU when the GPU refuses (out of
memory, k above what GPU search supports).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import faiss
import numpy as np
import torch
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from pipeline.eval import faiss_device
from pipeline.eval.rerank import Ranker, Rerank

CHUNK_ROWS = 4096            # queries searched at a time
_MAX_CHUNK_ELEMENTS = 1 << 25  # fewer rows per chunk when k is large: memory stays rows x k
_GPU_MAX_K = 2048            # faiss GPU search supports k up to this
KMEANS_NITER = 20
KMEANS_SEED = 1234
_FINITE_CHECK_ROWS = 1 << 16   # rows checked for NaN at a time: no n x dim temporary

log = logging.getLogger(__name__)


_gpu_resources: dict[int, object] = {}  # one faiss.StandardGpuResources per device, kept for the process


def _use_gpu() -> bool:
    """Search and cluster on the GPU where this faiss build sees one and a probe on it has worked."""
    return faiss_device.gpu_device() is not None


def _on_own_gpu(index: faiss.Index) -> faiss.Index:
    """`index` on this process's GPU: torch's current device, which pipeline.parallel.distributed sets to the
    rank's own. Not index_cpu_to_all_gpus (nor Kmeans(gpu=True), which calls it): that opens a
    context and copies the data onto every GPU of the node, whose memory the other ranks hold."""
    device = faiss_device.gpu_device()
    if device not in _gpu_resources:
        _gpu_resources[device] = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_gpu_resources[device], device, index)


def flat_ip_index(gallery: np.ndarray, k: int) -> faiss.Index:
    """Exact inner-product index over the gallery: on the GPU(s) when possible, else on the CPU."""
    if _use_gpu() and k <= _GPU_MAX_K:
        try:
            index = _on_own_gpu(faiss.IndexFlatIP(gallery.shape[1]))
            index.add(gallery)
            return index
        except (RuntimeError, MemoryError) as e:  # faiss reports GPU out-of-memory as RuntimeError
            log.warning("faiss GPU index failed (%s); searching on the CPU", str(e).splitlines()[0])
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    return index


def _embeddings(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()   # .float() first: numpy has no bfloat16
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, dim) array, got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape})")
    for start in range(0, len(x), _FINITE_CHECK_ROWS):
        bad = ~np.isfinite(x[start:start + _FINITE_CHECK_ROWS]).all(axis=1)
        if bad.any():
            raise ValueError(f"{name} contains NaN or inf values (row {start + int(np.argmax(bad))} is the first); "
                             f"the model that made them has diverged or the embeddings file is corrupt")
    return x


def _labels(y, n: int, name: str) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if len(y) != n:
        raise ValueError(f"{name} has {len(y)} labels but there are {n} embedding rows")
    if y.dtype.kind not in "biuf" or (y.dtype.kind == "f" and not np.all(y == np.round(y))):
        raise ValueError(f"{name} must hold integer class ids, got dtype {y.dtype}")
    return y.astype(np.int64)


def relevant_counts(query_labels: np.ndarray, gallery_labels: np.ndarray, loo: bool) -> np.ndarray:
    """R per query: gallery items sharing its label (minus itself in leave-one-out)."""
    classes, counts = np.unique(gallery_labels, return_counts=True)
    pos = np.clip(np.searchsorted(classes, query_labels), 0, len(classes) - 1)
    r = np.where(classes[pos] == query_labels, counts[pos], 0)
    return r - int(loo)


def self_mask(nbrs: np.ndarray, self_idx: np.ndarray | None) -> np.ndarray:
    """Where each query itself sits in its neighbour list (found by index, not by rank: ties and
    duplicates mean it need not come first). If it fell outside the k searched, the last column
    is marked instead, so every row keeps k - 1 neighbours. None: nothing to drop."""
    if self_idx is None:
        return np.zeros(nbrs.shape, dtype=bool)
    is_self = nbrs == self_idx[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    return is_self


def _score_chunk(nbrs: np.ndarray, self_idx: np.ndarray | None, relevant: np.ndarray, r: np.ndarray,
                 ks: Sequence[int]) -> dict[str, float]:
    """Sums over a chunk's queries. nbrs: their neighbours, nearest first; relevant[i, j]: whether
    nbrs[i, j] has query i's label; self_idx: the queries' own indices in leave-one-out."""
    n = len(nbrs)
    is_self = self_mask(nbrs, self_idx)
    relevant &= ~is_self
    # recall@k from the rank of the first relevant neighbour (ranks counted without the query itself)
    first = relevant.argmax(axis=1)
    found = relevant[np.arange(n), first]
    first_rank = first - (is_self.argmax(axis=1) < first) if self_idx is not None else first
    sums = {f"recall@{k}": float((found & (first_rank < k)).sum()) for k in ks}
    # MAP@R and R-precision look at the first R neighbours only: compact that narrow slice.
    width = min(int(r.max()) + int(self_idx is not None), nbrs.shape[1])
    keep = ~is_self[:, :width]
    if self_idx is not None:
        keep[keep.all(axis=1), -1] = False
    rel = relevant[:, :width][keep].reshape(n, -1)
    rank = np.arange(1, rel.shape[1] + 1)
    rel &= rank[None, :] <= r[:, None]                       # only the first R ranks count
    hits = np.cumsum(rel, axis=1)
    sums["map@r"] = float((((hits / rank) * rel).sum(axis=1) / r).sum())
    sums["r_precision"] = float((hits[:, -1] / r).sum())
    return sums


def retrieval_metrics(query, query_labels, gallery=None, gallery_labels=None,
                      ks: Sequence[int] = (1, 2, 4, 8), nmi: bool = True, rerank: Rerank | None = None) -> dict:
    """Recall@k, MAP@R, R-precision (and NMI/AMI) of `query` against `gallery`; see the module doc.

    query, gallery: (n, dim) float arrays or tensors, L2-normalised by the caller.
    gallery=None: leave-one-out on the query set. Returns a dict of Python floats and ints.
    rerank: the neighbour lists re-ranked (pipeline/eval/rerank.py; each query still left out of its
    own, leave-one-out); None or method none: plain exact kNN.
    """
    if (gallery is None) != (gallery_labels is None):
        raise ValueError("gallery and gallery_labels must be given together (or both left out)")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive integers, got {ks}")
    faiss_device.cpu_threads()
    q = _embeddings(query, "query")
    q_labels = _labels(query_labels, len(q), "query_labels")
    loo = gallery is None
    if loo:
        g, g_labels = q, q_labels
    else:
        g = _embeddings(gallery, "gallery")
        g_labels = _labels(gallery_labels, len(g), "gallery_labels")
        if g.shape[1] != q.shape[1]:
            raise ValueError(f"query dim {q.shape[1]} differs from gallery dim {g.shape[1]}")

    r = relevant_counts(q_labels, g_labels, loo)
    scored = np.flatnonzero(r > 0)
    names = [f"recall@{k}" for k in ks] + ["map@r", "r_precision"]
    totals = dict.fromkeys(names, 0.0)
    if len(scored) and rerank is not None and rerank.method != "none":
        _score_reranked(rerank, q, q_labels, g, g_labels, scored, r, loo, ks, totals)
    elif len(scored):
        # R is not capped, so search deep enough for the largest R (+1 for the query itself).
        k_search = min(max(max(ks), int(r[scored].max())) + int(loo), len(g))
        index = flat_ip_index(g, k_search)
        rows = max(1, min(CHUNK_ROWS, _MAX_CHUNK_ELEMENTS // k_search))
        for start in range(0, len(scored), rows):
            idx = scored[start:start + rows]
            _, nbrs = index.search(q[idx], k_search)
            relevant = g_labels[nbrs] == q_labels[idx, None]
            for name, value in _score_chunk(nbrs, idx if loo else None, relevant, r[idx], ks).items():
                totals[name] += value

    n = len(scored)
    out: dict = {name: (totals[name] / n if n else float("nan")) for name in names}
    out["num_queries"] = int(n)
    out["num_excluded"] = int(len(q) - n)
    if nmi:
        out.update(_clustering_scores(q, q_labels))
    return out


def _score_reranked(rerank: Rerank, q, q_labels, g, g_labels, scored, r, loo: bool, ks, totals: dict) -> None:
    """The metrics' sums over the re-ranked neighbour lists (which never hold the query itself)."""
    k_search = min(max(max(ks), int(r[scored].max())), len(g) - int(loo))
    # the deepest search a method makes (dba's, in leave-one-out, also depends on the data: len(g))
    deepest = len(g) if rerank.method == "dba" else max(k_search, rerank.shortlist, rerank.n) + 1
    ranker = Ranker(rerank, g, lambda vectors: flat_ip_index(vectors, deepest).search)
    rows = max(1, min(CHUNK_ROWS, _MAX_CHUNK_ELEMENTS // k_search))
    for start in range(0, len(scored), rows):
        idx = scored[start:start + rows]
        nbrs = ranker(q[idx], k_search, idx if loo else None)
        relevant = g_labels[nbrs] == q_labels[idx, None]
        for name, value in _score_chunk(nbrs, None, relevant, r[idx], ks).items():
            totals[name] += value


def _kmeans_assign(x: np.ndarray, n_clusters: int, gpu: bool) -> np.ndarray:
    # faiss prints "WARNING clustering N points to K centroids" to stderr below 39 points per centroid
    # (its min_points_per_centroid, read for that warning only): here the classes are the centroids, so
    # that is the data, not a mistake; the log file says it at debug level instead.
    options = dict(niter=KMEANS_NITER, seed=KMEANS_SEED, verbose=False, min_points_per_centroid=1)
    if len(x) < 39 * n_clusters:
        log.debug("k-means: %d points for %d centroids (faiss advises 39 per centroid)", len(x), n_clusters)
    # Random init often puts two seeds in one class and merges two others, even when classes are
    # perfectly separated; k-means++ (recent faiss; costs a few iterations) avoids most of that.
    if hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):
        options["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    kmeans = faiss.Kmeans(x.shape[1], n_clusters, **options)
    if gpu:  # its own index on this process's GPU, not Kmeans(gpu=True)'s copies on all of them
        kmeans.index = _on_own_gpu(kmeans.index)
    kmeans.train(x)
    _, assign = kmeans.index.search(x, 1)
    return assign[:, 0]


def _clustering_scores(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """NMI and AMI of seeded faiss k-means with one cluster per distinct label."""
    n_clusters = len(np.unique(labels))
    try:
        assign = _kmeans_assign(x, n_clusters, gpu=_use_gpu())
    except (RuntimeError, MemoryError) as e:
        if not _use_gpu():
            raise
        log.warning("faiss GPU k-means failed (%s); clustering on the CPU", str(e).splitlines()[0])
        assign = _kmeans_assign(x, n_clusters, gpu=False)
    return {"nmi": float(normalized_mutual_info_score(labels, assign)),
            "ami": float(adjusted_mutual_info_score(labels, assign))}
