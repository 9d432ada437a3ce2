"""Re-ranking of a kNN search at query time, on L2-normalised float32 vectors (inner product = cosine).

    aqe          alpha-query expansion (Radenović, Tolias, Chum, "Fine-tuning CNN Image Retrieval with No
                 Human Annotation", TPAMI 2018): the query is replaced by the L2-normalised sum of itself
                 (weight 1) and its top-n neighbours x_j, each weighted by max(0, q.x_j)^alpha, and searched again
    dba          database-side augmentation (same paper): every gallery vector is replaced, once, by the same
                 weighted sum over itself and its top-n gallery neighbours (`augment`; stage=index stores the
                 augmented vectors with index.dba=true); queries are searched against them unchanged
    kreciprocal  k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, "Re-ranking Person Re-identification with
                 k-reciprocal Encoding", CVPR 2017) of the query's top `shortlist` candidates: the final
                 distance is (1 - lambda) Jaccard + lambda original, computed over the query and its shortlist
                 only (so a query costs O(shortlist^3) at most, whatever the gallery). Candidates beyond the
                 shortlist share no k-reciprocal neighbour with the query there (Jaccard distance 1): they
                 follow the shortlist in their kNN order, as the same formula orders them.

Defaults, from the authors: alpha = 3 (Radenović et al. chose it; their released cnnimageretrieval-pytorch
has no query expansion, so the common n = 10 is JDAI-CV/fast-reid's fastreid/evaluation/query_expansion.py
lines 15-16, `qe_k=10, alpha=3.0`, there counting the query itself); k1 = 20, k2 = 6, lambda = 0.3
(zhunzhong07/person-re-ranking, python-version/re_ranking_ranklist.py lines 23 and 32). The k-reciprocal
steps follow that file's: squared Euclidean distances (2 - 2 cos on unit vectors) divided by each row's
largest; R(i, k1) from the top k1 + 1 (the point itself included); a candidate's R(c, round(k1 / 2)) added
when more than 2/3 of it lies in R(i, k1) (compared in integers: 3|overlap| > 2|R|, which the authors'
float comparison equals for every set size below 200); weights exp(-distance) normalised to sum 1; local
query expansion over the top k2 (skipped for k2 = 1); Jaccard distance 1 - sum min / sum max.

Leave-one-out (a split searched against itself, as the eval protocol does): `exclude` names, for each
query, its own gallery row. It is left out of every neighbour list a method uses (the expansion's
neighbours, the shortlist, the final list) exactly as plain kNN leaves it out, and for dba the gallery
is augmented as if that row were not in it (`Ranker`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

METHODS = ("none", "aqe", "dba", "kreciprocal")  # pipeline/config/schema.py's RERANKS
Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (queries, k) -> (scores, ids), faiss's way
_BLOCK_ELEMENTS = 1 << 24  # floats a batch of k-reciprocal sets may hold per array


@dataclass(frozen=True)
class Rerank:
    """A re-ranking and its parameters (config: search.rerank / eval.rerank and rerank.*)."""
    method: str = "none"
    n: int = 10
    alpha: float = 3.0
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    shortlist: int = 100

    @classmethod
    def of(cls, method: str, params) -> Rerank:
        """From a method name and a config's `rerank` section (pipeline.config.RerankConfig)."""
        return cls(method, params.n, params.alpha, params.k1, params.k2, params.lambda_value, params.shortlist)

    def search(self, search: Search, vectors: np.ndarray, queries: np.ndarray, k: int,
               exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k best gallery rows per query, best first. `search` searches the gallery as
        the index holds it (for dba: the augmented vectors), `vectors` are its rows (a memory map will do:
        only the rows a query needs are read). score: the cosine for none and dba, the expanded query's
        inner product for aqe, 1 - the final distance for kreciprocal."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.method == "aqe":
            sims, ids = knn(search, queries, self.n, exclude)
            return knn(search, expand(queries, vectors, ids, sims, self.alpha), k, exclude)
        if self.method == "kreciprocal":
            return kreciprocal(search, vectors, queries, k, exclude, self)
        return knn(search, queries, k, exclude)  # none; dba: the gallery was augmented beforehand


def knn(search: Search, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """search(queries, k), or with each query's own row `exclude` dropped (found by id: ties and duplicates
    need not put it first; where it is not among the k + 1 found, the last is dropped, as plain kNN does)."""
    if exclude is None:
        return search(queries, k)
    scores, ids = search(queries, k + 1)
    own = ids == np.asarray(exclude)[:, None]
    own[~own.any(axis=1), -1] = True
    keep = ~own
    rows = len(ids)
    return scores[keep].reshape(rows, -1)[:, :k], ids[keep].reshape(rows, -1)[:, :k]


def expand(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, sims: np.ndarray, alpha: float) -> np.ndarray:
    """normalise(q + sum_j w_j x_j) over each query's neighbours `ids` (-1: none), w_j = weight(sim_j)."""
    out = weighted_sum(queries, vectors, ids, sims, alpha)
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def weighted_sum(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, sims: np.ndarray, alpha: float) -> np.ndarray:
    """q + sum_j w_j x_j, before expand's normalisation (dba's leave-one-out corrects these sums)."""
    return queries + np.einsum("qn,qnd->qd", weight(sims, ids, alpha), _rows(vectors, np.maximum(ids, 0)))


def weight(sims: np.ndarray, ids: np.ndarray, alpha: float) -> np.ndarray:
    """max(0, sim)^alpha per neighbour, 0 where there is none (id -1). The clip at 0 keeps a fractional power
    real; the papers' neighbours are all positive."""
    return np.where(ids >= 0, np.maximum(sims, 0.0) ** alpha, 0.0).astype(np.float32)


def exact_search(vectors: np.ndarray) -> Search:
    """Exact inner-product search over `vectors` (faiss, CPU), in blocks (they may be a memory map)."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    for start in range(0, len(vectors), 65536):
        index.add(np.ascontiguousarray(vectors[start:start + 65536], dtype=np.float32))
    return index.search


def augment(vectors: np.ndarray, n: int, alpha: float, search: Search | None = None,
            rows_per_block: int = 4096) -> np.ndarray:
    """Database-side augmentation: each row replaced by expand(row, its top-n other rows). `search`: an
    exact search over `vectors` (default: a flat faiss index); n x the gallery's size inner products."""
    search = search or exact_search(vectors)
    out = np.empty((len(vectors), vectors.shape[1]), dtype=np.float32)
    for start in range(0, len(vectors), rows_per_block):
        rows = np.arange(start, min(start + rows_per_block, len(vectors)))
        block = np.ascontiguousarray(vectors[rows], dtype=np.float32)
        sims, ids = knn(search, block, n, rows)
        out[rows] = expand(block, vectors, ids, sims, alpha)
    return out


def kreciprocal(search: Search, vectors: np.ndarray, queries: np.ndarray, k: int, exclude: np.ndarray | None,
                rr: Rerank) -> tuple[np.ndarray, np.ndarray]:
    """The top max(k, shortlist) candidates re-ranked by the k-reciprocal final distance (module doc)."""
    sims, ids = knn(search, queries, max(k, rr.shortlist), exclude)
    m = min(rr.shortlist, int((ids >= 0).all(axis=0).sum()))  # the shortlist every query has in full
    final = np.empty(ids.shape, dtype=np.float32)
    rows = max(1, _BLOCK_ELEMENTS // ((m + 1) ** 2 * max(rr.k2, 1)))
    for start in range(0, len(queries), rows):
        part = slice(start, start + rows)
        points = np.concatenate([queries[part, None, :], _rows(vectors, ids[part, :m])], axis=1)
        head, largest = final_distances(points, rr.k1, rr.k2, rr.lambda_value)
        final[part, :m] = head
        # beyond the shortlist: Jaccard distance 1, the original distance over the same row maximum (>= 1)
        final[part, m:] = (1 - rr.lambda_value) + rr.lambda_value * np.maximum(2 - 2 * sims[part, m:], 0) / largest
    final[ids < 0] = np.inf
    order = np.argsort(final, axis=1, kind="stable")[:, :k]
    return 1 - np.take_along_axis(final, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _rows(vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.asarray(vectors[ids.ravel()], dtype=np.float32).reshape(*ids.shape, -1)


def final_distances(points: np.ndarray, k1: int, k2: int, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(b, m + 1, d) sets, each a query (row 0) and its m candidates -> ((b, m) final distances of the
    candidates to the query, (b, 1) the query row's largest squared distance, which normalised them)."""
    size = points.shape[1]
    dist = np.maximum(2 - 2 * np.matmul(points, points.transpose(0, 2, 1)), 0)
    dist[:, np.arange(size), np.arange(size)] = 0
    largest = dist.max(axis=2, keepdims=True)
    largest = np.where(largest > 0, largest, 1)  # a set of identical points: distances stay 0
    dist = dist / largest
    rank = np.argsort(dist, axis=2, kind="stable")
    reciprocal = _reciprocal(rank, k1)
    half = _reciprocal(rank, int(np.around(k1 / 2)))
    overlap = np.matmul(reciprocal.astype(np.float32), half.transpose(0, 2, 1).astype(np.float32))  # |R(i) & R(c, k1/2)|
    joins = reciprocal & (3 * overlap > 2 * half.sum(axis=2)[:, None, :])
    expanded = reciprocal | (np.matmul(joins.astype(np.float32), half.astype(np.float32)) > 0)
    weights = np.where(expanded, np.exp(-dist), 0).astype(np.float32)
    v = weights / weights.sum(axis=2, keepdims=True)
    if k2 != 1:  # local query expansion: the mean over each point's top k2 (itself first)
        v = np.take_along_axis(v[:, None, :, :], rank[:, :, :k2, None], axis=2).mean(axis=2)
    shared = np.minimum(v[:, :1, :], v).sum(axis=2)  # (b, size): sum_j min(V_query, V_i)
    jaccard = 1 - shared / (2 - shared)
    final = (1 - lam) * jaccard + lam * dist[:, 0, :]
    return final[:, 1:], largest[:, 0, :]


def _reciprocal(rank: np.ndarray, k: int) -> np.ndarray:
    """(b, size, size) booleans: j in R(i, k) (each in the other's top k + 1, the point itself included)."""
    top = np.zeros(rank.shape, dtype=bool)
    np.put_along_axis(top, rank[:, :, :k + 1], True, axis=2)
    return top & top.transpose(0, 2, 1)


class Ranker:
    """Re-ranked neighbours of queries in one gallery held in memory (the eval stage's metrics):
    `ranker(queries, k, exclude)` -> ids (q, k). dba augments the gallery here; in leave-one-out, the
    gallery rows that had the query among their n neighbours are scored as augmented without it (the
    next neighbour in its place), so the query never sees itself through the augmentation."""

    def __init__(self, rerank: Rerank, gallery: np.ndarray, make_search: Callable[[np.ndarray], Search] = exact_search):
        self.rerank, self.gallery = rerank, gallery
        if rerank.method != "dba":
            self.search = make_search(gallery)
            return
        raw = make_search(gallery)
        everyone = np.arange(len(gallery))
        self.sims, self.ids = knn(raw, gallery, rerank.n + 1, everyone)  # one spare per row, for leave-one-out
        self.sums = self._sums(self.ids[:, :rerank.n], self.sims[:, :rerank.n])
        self.search = make_search(self.sums / np.linalg.norm(self.sums, axis=1, keepdims=True))

    def _sums(self, ids: np.ndarray, sims: np.ndarray) -> np.ndarray:
        """Unnormalised q + sum_j w_j x_j of every gallery row (expand before its normalisation)."""
        out = np.empty(self.gallery.shape, dtype=np.float32)
        for start in range(0, len(ids), 4096):
            part = slice(start, start + 4096)
            out[part] = weighted_sum(self.gallery[part], self.gallery, ids[part], sims[part], self.rerank.alpha)
        return out

    def __call__(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
        if self.rerank.method != "dba" or exclude is None:
            return self.rerank.search(self.search, self.gallery, queries, k, exclude)[1]
        holders = [self._holders(int(own)) for own in exclude]
        # every row but a query's holders and itself keeps its score: k of them are in its first k + 1 + holders
        depth = min(k + 1 + max(len(h) for h, _ in holders), len(self.gallery))
        scores, ids = self.search(np.ascontiguousarray(queries, dtype=np.float32), depth)
        return np.stack([self._merge(q, int(own), h, slot, s, i, k)
                         for q, own, (h, slot), s, i in zip(queries, exclude, holders, scores, ids)])

    def _holders(self, own: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows whose augmentation used row `own`, and where in their neighbour lists it stands."""
        if not hasattr(self, "_inverse"):
            flat = self.ids[:, :self.rerank.n].ravel()
            self._inverse = np.argsort(flat, kind="stable")
            self._sorted = flat[self._inverse]
        lo, hi = np.searchsorted(self._sorted, [own, own + 1])
        cells = self._inverse[lo:hi]
        return cells // self.rerank.n, cells % self.rerank.n

    def _merge(self, query, own, holders, slot, scores, ids, k) -> np.ndarray:
        """The top k of row `own` against the gallery augmented without it: its holders re-scored with
        `own` replaced by their spare neighbour, the other rows as searched."""
        n, alpha = self.rerank.n, self.rerank.alpha
        spare = self.ids[holders, n]
        w_own = np.maximum(self.sims[holders, slot], 0.0) ** alpha
        w_spare = np.where(spare >= 0, np.maximum(self.sims[holders, n], 0.0) ** alpha, 0.0)
        fixed = (self.sums[holders] - w_own[:, None] * self.gallery[own]
                 + w_spare[:, None] * self.gallery[np.maximum(spare, 0)])
        fixed_scores = fixed @ query / np.linalg.norm(fixed, axis=1)
        keep = (ids >= 0) & (ids != own) & ~np.isin(ids, holders)
        all_ids = np.concatenate([ids[keep], holders])
        order = np.argsort(-np.concatenate([scores[keep], fixed_scores]), kind="stable")[:k]
        return all_ids[order]
