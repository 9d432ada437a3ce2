"""Where a model fails: the evaluation's queries whose top-1 is of another class, worst first, for the
"where it fails" view of stage=serve's page (eval/failures.json).

    listing = failures(evaluation, data, model)   # data: split -> {"embeddings", "labels", "keys"}

Worst first means: the later a query's first correct result comes (its rank; none within the first
DEPTH results ranks after all), the worse; between equal ranks, the larger the gap between the wrong
top-1's similarity and the first correct result's (beyond DEPTH: the DEPTH-th result's, a lower bound).
Each failure names the query, its wrong top-1 and its first correct result (or null). Queries with no
relevant gallery item are left out: no top-1 of theirs can be right. The MAX_LISTED worst are kept;
`wrong` counts them all.
"""
from __future__ import annotations

import numpy as np

from pipeline.eval.metrics import relevant_counts
from pipeline.eval.retrievals import nearest
from pipeline.protocols import Evaluation

DEPTH = 100        # results searched per query for its first correct one
MAX_LISTED = 500   # failures kept in the file (the worst ones)


def failures(evaluation: Evaluation, data: dict[str, dict], model: str, depth: int = DEPTH,
             max_listed: int = MAX_LISTED) -> dict:
    q_split, g_split = evaluation.query, evaluation.gallery or evaluation.query
    q, g = data[q_split], data[g_split]
    loo = evaluation.gallery is None
    sims, nbrs = nearest(q["embeddings"], g["embeddings"], depth, own=np.arange(len(q["labels"])) if loo else None)
    correct = g["labels"][nbrs] == q["labels"][:, None]
    scored = relevant_counts(q["labels"], g["labels"], loo) > 0
    wrong = np.flatnonzero(scored & ~correct[:, 0])
    found = correct[wrong].any(axis=1)
    first = np.where(found, correct[wrong].argmax(axis=1), sims.shape[1] - 1)  # column of the first correct
    gap = sims[wrong, 0] - sims[wrong, first]
    rank = np.where(found, first + 1, np.iinfo(np.int64).max)
    order = np.lexsort((-gap, -rank))[:max_listed]  # rank descending, then gap descending

    def item(split: str, d: dict, j: int, similarity: float | None = None) -> dict:
        out = {"split": split, "index": int(j), "key": str(d["keys"][j]), "label": int(d["labels"][j])}
        return out if similarity is None else {**out, "similarity": float(similarity)}

    listed = []
    for o in order:
        i, col = int(wrong[o]), int(first[o])
        listed.append({"query": item(q_split, q, i), "top1": item(g_split, g, nbrs[i, 0], sims[i, 0]),
                       "first_correct": ({**item(g_split, g, nbrs[i, col], sims[i, col]), "rank": col + 1}
                                         if found[o] else None),
                       "gap": float(gap[o])})
    return {"model": model, "query_split": q_split, "gallery_split": g_split, "depth": sims.shape[1],
            "queries": int(scored.sum()), "wrong": len(wrong), "failures": listed}
