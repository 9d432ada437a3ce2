"""What a model retrieves, for eval/retrievals.png: a seeded sample of queries and the worst queries
(lowest average precision), each with its top-k results, for every evaluated model on the same queries.

    layout = retrieval_layout(evaluation, data, n_queries, k, seed)   # data: model -> split -> embeddings file
    plots.retrievals(layout, image_of, path)                          # draws exactly this layout

The layout (saved as eval/retrievals.json) lists one row per query shown and, per model, its k
results nearest first: sample index, key, label, similarity, and the frame it is drawn with, green
for the query's class and red otherwise. The worst queries are those of the last model evaluated
(the finetuned one, in the default order), shown for the other models too. A query's average
precision is MAP@R's term (Musgrave et al. 2020): the mean over its first R results of precision@i
at the relevant ones, R being the number of relevant gallery items; queries with none are not shown.
"""
from __future__ import annotations

import numpy as np

from pipeline.eval.metrics import flat_ip_index, relevant_counts, self_mask
from pipeline.protocols import Evaluation

CHUNK = 4096  # queries searched at a time
FRAMES = {True: "green", False: "red"}


def nearest(queries: np.ndarray, gallery: np.ndarray, k: int, own: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, gallery indices) of each query's k nearest, nearest first. `own`: in leave-one-
    out, each query's own index in the gallery, left out of its list (by index, not by rank)."""
    extra = int(own is not None)
    k = min(k, len(gallery) - extra)
    index = flat_ip_index(np.ascontiguousarray(gallery, dtype=np.float32), k + extra)
    sims, nbrs = [], []
    for start in range(0, len(queries), CHUNK):
        q = np.ascontiguousarray(queries[start:start + CHUNK], dtype=np.float32)
        s, n = index.search(q, k + extra)
        if own is not None:
            keep = ~self_mask(n, own[start:start + CHUNK])
            s, n = s[keep].reshape(len(q), k), n[keep].reshape(len(q), k)
        sims.append(s)
        nbrs.append(n)
    return np.concatenate(sims), np.concatenate(nbrs)


def average_precision_at_r(query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray | None = None,
                           gallery_labels: np.ndarray | None = None) -> np.ndarray:
    """Each query's AP@R (MAP@R's per-query term); NaN for queries with no relevant gallery item."""
    loo = gallery is None
    gallery, g_labels = (query, query_labels) if loo else (gallery, gallery_labels)
    r = relevant_counts(query_labels, g_labels, loo)
    ap = np.full(len(query), np.nan)
    scored = np.flatnonzero(r > 0)
    if len(scored) == 0:
        return ap
    _, nbrs = nearest(query, gallery, int(r.max()), own=np.arange(len(query)) if loo else None)
    relevant = g_labels[nbrs[scored]] == query_labels[scored, None]
    rank = np.arange(1, relevant.shape[1] + 1)
    relevant &= rank[None, :] <= r[scored, None]  # only the first R ranks count
    hits = np.cumsum(relevant, axis=1)
    ap[scored] = ((hits / rank) * relevant).sum(axis=1) / r[scored]
    return ap


def pick_queries(ap: np.ndarray, n: int, seed: int) -> list[tuple[str, int]]:
    """n seeded queries and the n worst others, as (kind, query index); only queries that have an AP."""
    scored = np.flatnonzero(~np.isnan(ap))
    sample = np.random.default_rng(seed).choice(scored, size=min(n, len(scored)), replace=False)
    rest = np.setdiff1d(scored, sample)
    worst = rest[np.argsort(ap[rest], kind="stable")[:n]]
    return [("random", int(i)) for i in sample] + [("worst", int(i)) for i in worst]


def retrieval_layout(evaluation: Evaluation, data: dict[str, dict[str, dict]], n_queries: int, k: int,
                     seed: int) -> dict:
    """data: model -> split -> {"embeddings", "labels", "keys"} (the eval stage's files)."""
    models = list(data)
    last = data[models[-1]]
    q_split, g_split = evaluation.query, evaluation.gallery or evaluation.query

    def split_of(model):
        q = data[model][q_split]
        g = data[model][g_split] if evaluation.gallery else None
        return q, g

    q, g = split_of(models[-1])
    ap = average_precision_at_r(q["embeddings"], q["labels"], *((g["embeddings"], g["labels"]) if g is not None else ()))
    picked = pick_queries(ap, n_queries, seed)
    query_rows = np.array([i for _, i in picked], dtype=np.int64)
    layout = {"query_split": q_split, "gallery_split": g_split, "k": k, "ranked_by": models[-1],
              "rows": [{"kind": kind, "index": i, "key": str(last[q_split]["keys"][i]),
                        "label": int(last[q_split]["labels"][i]), "average_precision": float(ap[i])}
                       for kind, i in picked],
              "models": {}}
    for model in models:
        q, g = split_of(model)
        gallery = q if g is None else g
        sims, nbrs = nearest(q["embeddings"][query_rows], gallery["embeddings"], k,
                             own=query_rows if g is None else None)
        layout["models"][model] = [
            [{"index": int(j), "key": str(gallery["keys"][j]), "label": int(gallery["labels"][j]),
              "similarity": float(s), "frame": FRAMES[bool(gallery["labels"][j] == q["labels"][i])]}
             for s, j in zip(sims[row], nbrs[row])]
            for row, i in enumerate(query_rows)]
    return layout

