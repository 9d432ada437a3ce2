"""eval/failures.json (pipeline/eval/failures.py) against a dense numpy ranking of the same embeddings."""
import numpy as np
import pytest

from pipeline.eval.failures import failures
from pipeline.protocols import Evaluation


def normalised(rng, n, d=8):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def dense(q, ql, g, gl, loo, depth):
    """Each query's failure by the definition, from a full similarity matrix sorted by numpy."""
    sims = q @ g.T
    if loo:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :depth]
    out = []
    for i in range(len(q)):
        relevant = (gl == ql[i]).sum() - int(loo)
        row = order[i]
        if relevant == 0 or gl[row[0]] == ql[i]:
            continue
        hits = [c for c, j in enumerate(row) if gl[j] == ql[i]]
        col = hits[0] if hits else len(row) - 1
        out.append((i, int(row[0]), (int(row[col]), col + 1) if hits else None,
                    float(sims[i, row[0]] - sims[i, row[col]]), hits[0] + 1 if hits else np.inf))
    out.sort(key=lambda f: (-f[4], -f[3]))
    return out


@pytest.mark.parametrize("loo", [True, False])
def test_failures_are_the_wrong_top1s_worst_first(loo):
    rng = np.random.default_rng(0)
    q, ql = normalised(rng, 120), rng.integers(0, 12, 120)
    ql[0] = 99  # a class with no other member: left out
    g, gl = (q, ql) if loo else (normalised(rng, 90), rng.integers(0, 12, 90))
    data = {"q": {"embeddings": q, "labels": ql, "keys": np.array([f"q{i}" for i in range(len(q))])}}
    data["g"] = data["q"] if loo else {"embeddings": g, "labels": gl, "keys": np.array([f"g{i}" for i in range(len(g))])}
    depth = 6  # small, so that some queries have no correct result within it
    got = failures(Evaluation("e", "q", None if loo else "g"), data, "finetuned", depth=depth, max_listed=1000)
    want = dense(q, ql, g, gl, loo, depth)
    assert got["wrong"] == len(want) == len(got["failures"]) > 10
    assert any(w[2] is None for w in want) and any(w[2] is not None for w in want)
    assert got["queries"] == len(q) - 1 and got["depth"] == depth and got["model"] == "finetuned"
    gname = "q" if loo else "g"
    for f, (i, top1, first, gap, _) in zip(got["failures"], want):
        assert f["query"] == {"split": "q", "index": i, "key": f"q{i}", "label": int(ql[i])}
        assert f["top1"]["key"] == f"{gname}{top1}" and f["top1"]["label"] != f["query"]["label"]
        assert f["top1"]["similarity"] == pytest.approx(float(q[i] @ g[top1]), abs=1e-5)
        assert f["gap"] == pytest.approx(gap, abs=1e-5)
        if first is None:
            assert f["first_correct"] is None
        else:
            assert (f["first_correct"]["key"], f["first_correct"]["rank"]) == (f"{gname}{first[0]}", first[1])
            assert f["first_correct"]["label"] == f["query"]["label"]
    fewer = failures(Evaluation("e", "q", None if loo else "g"), data, "finetuned", depth=depth, max_listed=5)
    assert fewer["failures"] == got["failures"][:5] and fewer["wrong"] == got["wrong"]
