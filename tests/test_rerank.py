"""Re-ranking (pipeline/eval/rerank.py): each method against a dense numpy port of its formula, leave-one-out
included; the metrics over re-ranked lists; the config's refusals."""
import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.eval.metrics import retrieval_metrics
from pipeline.eval.rerank import Ranker, Rerank, augment, exact_search


def unit(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clusters(rng, n=60, d=16, classes=6, spread=0.6):
    """Points around class centres, so the neighbours are structured (and positives dominate)."""
    labels = rng.integers(0, classes, n)
    x = unit(rng, classes, d)[labels] + spread * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


# ---- dense references, written from the papers' formulas (float64, full matrices, plain loops)

def dense_order(scores, own=None):
    order = [j for j in np.argsort(-scores, kind="stable") if j != own]
    return np.array(order)


def dense_expand(q, rows, sims, alpha):
    v = q.astype(np.float64) + sum(max(s, 0.0) ** alpha * r for s, r in zip(sims, rows.astype(np.float64)))
    return v / np.linalg.norm(v)


def dense_aqe(q, g, k, n, alpha, own=None):
    sims = g.astype(np.float64) @ q
    top = dense_order(sims, own)[:n]
    expanded = dense_expand(q, g[top], sims[top], alpha)
    return dense_order(g.astype(np.float64) @ expanded, own)[:k]


def dense_dba(g, n, alpha):
    s = g.astype(np.float64) @ g.T.astype(np.float64)
    out = []
    for j in range(len(g)):
        top = dense_order(s[j], j)[:n]
        out.append(dense_expand(g[j], g[top], s[j, top], alpha))
    return np.array(out)


def dense_dba_left_out(x, i, k, n, alpha):
    """Row i against the other rows, DBA computed on the gallery without row i."""
    others = np.array([j for j in range(len(x)) if j != i])
    augmented = dense_dba(x[others], n, alpha)
    return others[dense_order(augmented @ x[i].astype(np.float64))[:k]]


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """A straight port of Zhong et al.'s formulas (their re_ranking, loops and all) on the full set."""
    original = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]]) ** 2
    original = (original / original.max(axis=0)).T
    num_query, total = q_g_dist.shape[0], original.shape[0]
    rank = np.argsort(original, kind="stable")
    V = np.zeros_like(original)

    def reciprocal(i, k):
        forward = rank[i, :k + 1]
        return forward[[i in rank[f, :k + 1] for f in forward]]

    for i in range(total):
        r = reciprocal(i, k1)
        expansion = list(r)
        for c in r:
            rc = reciprocal(c, int(np.around(k1 / 2)))
            if len(np.intersect1d(rc, r)) > 2 / 3 * len(rc):
                expansion += list(rc)
        expansion = np.unique(expansion)
        w = np.exp(-original[i, expansion])
        V[i, expansion] = w / w.sum()
    if k2 != 1:
        V = np.array([V[rank[i, :k2]].mean(axis=0) for i in range(total)])
    jaccard = np.zeros((num_query, total))
    for i in range(num_query):
        overlap = np.minimum(V[i][None, :], V).sum(axis=1)
        jaccard[i] = 1 - overlap / (2 - overlap)
    final = jaccard * (1 - lambda_value) + original[:num_query] * lambda_value
    return final[:, num_query:]


def euclid(a, b):
    return np.sqrt(np.maximum(2 - 2 * a.astype(np.float64) @ b.T.astype(np.float64), 0))


# ---- each method against its dense reference

@pytest.mark.parametrize("alpha", [3.0, 0.0])
def test_aqe_equals_the_dense_formula_and_leaves_the_query_out_in_leave_one_out(alpha):
    rng = np.random.default_rng(0)
    g, _ = clusters(rng)
    queries = unit(rng, 7)
    rr = Rerank("aqe", n=5, alpha=alpha)
    _, ids = rr.search(exact_search(g), g, queries, 8)
    assert ids.tolist() == [dense_aqe(q, g, 8, 5, alpha).tolist() for q in queries]
    rows = np.arange(0, 60, 7)  # leave-one-out: the queries are gallery rows
    _, ids = rr.search(exact_search(g), g, g[rows], 8, exclude=rows)
    assert ids.tolist() == [dense_aqe(g[i], g, 8, 5, alpha, own=i).tolist() for i in rows]
    assert not (ids == rows[:, None]).any()


def test_dba_augments_as_the_dense_formula_and_eval_leaves_the_query_out_of_the_augmentation():
    rng = np.random.default_rng(1)
    x, _ = clusters(rng, n=40)
    np.testing.assert_allclose(augment(x, 4, 3.0, rows_per_block=7), dense_dba(x, 4, 3.0), atol=1e-5)
    ranker = Ranker(Rerank("dba", n=4, alpha=3.0), x)
    rows = np.arange(40)
    got = ranker(x[rows], 6, rows)
    assert got.tolist() == [dense_dba_left_out(x, i, 6, 4, 3.0).tolist() for i in rows]
    queries = unit(rng, 5)  # query -> gallery: the gallery augmented once, queries as they are
    want = [dense_order(dense_dba(x, 4, 3.0) @ q.astype(np.float64))[:6].tolist() for q in queries]
    assert ranker(queries, 6).tolist() == want


def test_leaving_the_query_out_of_dba_matters():
    """Without the correction, rows that averaged the query in score it higher: the test above would
    fail on a naive leave-one-out (searching the gallery augmented with the query in it)."""
    rng = np.random.default_rng(1)
    x, _ = clusters(rng, n=40)
    naive = [dense_order(dense_dba(x, 4, 3.0) @ x[i].astype(np.float64), i)[:6].tolist() for i in range(40)]
    assert naive != [dense_dba_left_out(x, i, 6, 4, 3.0).tolist() for i in range(40)]


@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (7, 1, 0.5), (5, 3, 0.1)])
def test_kreciprocal_on_a_shortlist_of_the_whole_gallery_equals_the_dense_port(k1, k2, lam):
    rng = np.random.default_rng(2)
    g, _ = clusters(rng, n=50)
    queries = unit(rng, 4)
    rr = Rerank("kreciprocal", k1=k1, k2=k2, lambda_value=lam, shortlist=len(g))
    scores, ids = rr.search(exact_search(g), g, queries, len(g))
    for q, s, i in zip(queries, scores, ids):
        final = re_ranking(euclid(q[None], g), np.zeros((1, 1)), euclid(g, g), k1, k2, lam)[0]
        np.testing.assert_allclose(1 - s, final[i], atol=1e-5)
        assert i.tolist() == np.argsort(final, kind="stable").tolist()


def test_kreciprocal_leave_one_out_is_the_gallery_without_the_query_and_the_tail_keeps_its_knn_order():
    rng = np.random.default_rng(3)
    x, _ = clusters(rng, n=50)
    rr = Rerank("kreciprocal", shortlist=49)
    rows = np.array([0, 17, 33])
    _, ids = rr.search(exact_search(x), x, x[rows], 49, exclude=rows)
    for i, got in zip(rows, ids):
        others = np.array([j for j in range(50) if j != i])
        final = re_ranking(euclid(x[i:i + 1], x[others]), np.zeros((1, 1)), euclid(x[others], x[others]))[0]
        assert got.tolist() == others[np.argsort(final, kind="stable")].tolist()
    short = Rerank("kreciprocal", shortlist=10)  # beyond the shortlist: kNN order, after it
    _, ids = short.search(exact_search(x), x, x[rows], 30, exclude=rows)
    _, plain = Rerank().search(exact_search(x), x, x[rows], 30, exclude=rows)
    assert ids[:, 10:].tolist() == plain[:, 10:].tolist()
    assert [sorted(a) for a in ids[:, :10].tolist()] == [sorted(a) for a in plain[:, :10].tolist()]


# ---- the metrics over re-ranked lists, against metrics computed here from the dense lists

def dense_metrics(lists, labels, own_labels):
    """recall@1 and MAP@R from full neighbour lists (leave-one-out: R excludes the query)."""
    r1, maps = [], []
    for nbrs, label in zip(lists, own_labels):
        rel = labels[nbrs] == label
        R = int((labels == label).sum()) - 1
        r1.append(float(rel[0]))
        hits = np.cumsum(rel[:R])
        maps.append(float((hits / np.arange(1, R + 1) * rel[:R]).sum() / R))
    return {"recall@1": np.mean(r1), "map@r": np.mean(maps)}


@pytest.mark.parametrize("method", ["aqe", "dba", "kreciprocal"])
def test_metrics_over_reranked_lists_equal_the_dense_ones(method):
    rng = np.random.default_rng(4)
    x, labels = clusters(rng, n=40, classes=4, spread=1.2)
    rr = Rerank(method, n=3, alpha=3.0, shortlist=39)
    if method == "aqe":
        lists = [dense_aqe(x[i], x, 39, 3, 3.0, own=i) for i in range(40)]
    elif method == "dba":
        lists = [dense_dba_left_out(x, i, 39, 3, 3.0) for i in range(40)]
    else:
        lists = []
        for i in range(40):
            others = np.array([j for j in range(40) if j != i])
            final = re_ranking(euclid(x[i:i + 1], x[others]), np.zeros((1, 1)), euclid(x[others], x[others]))[0]
            lists.append(others[np.argsort(final, kind="stable")])
    got = retrieval_metrics(x, labels, ks=(1,), nmi=False, rerank=rr)
    want = dense_metrics(lists, labels, labels)
    assert got["recall@1"] == pytest.approx(want["recall@1"]) and got["map@r"] == pytest.approx(want["map@r"])
    plain = retrieval_metrics(x, labels, ks=(1,), nmi=False)
    assert retrieval_metrics(x, labels, ks=(1,), nmi=False, rerank=Rerank("none")) == plain


# ---- config

def test_rerank_settings_are_checked_in_one_line():
    assert load_config(["search.rerank=aqe"]).search.rerank == "aqe"
    assert load_config(["eval.rerank=[aqe,kreciprocal]"]).eval.rerankings() == ["aqe", "kreciprocal"]
    assert load_config(["eval.rerank=dba"]).eval.rerankings() == ["dba"]
    assert load_config([]).eval.rerankings() == []
    for bad, words in [("search.rerank=aqee", "did you mean 'aqe'"), ("eval.rerank=[aqe,qe]", "eval.rerank"),
                       ("eval.rerank=[aqe,aqe]", "each once"), ("rerank.k1=0", "rerank.k1"),
                       ("rerank.lambda_value=1.5", "rerank.lambda_value")]:
        with pytest.raises(UserError, match=words) as e:
            load_config([bad])
        assert "\n" not in str(e.value)


# ---- the eval stage: re-ranked rows beside the plain ones

def test_eval_reports_reranked_rows_beside_the_plain_ones(digits_run, tmp_path):
    import json
    import shutil

    from conftest import SMALL, run_pipeline

    from pipeline.eval.inference import load_embeddings

    run = shutil.copytree(digits_run, tmp_path / "run")
    before = json.loads((run / "eval" / "metrics.json").read_text())
    proc = run_pipeline("stage=eval", f"run_dir={run}", *SMALL, "eval.rerank=[aqe,dba,kreciprocal]", "rerank.n=3")
    after = json.loads((run / "eval" / "metrics.json").read_text())
    assert list(after) == ["frozen", "frozen+aqe", "frozen+dba", "frozen+kreciprocal",
                           "finetuned", "finetuned+aqe", "finetuned+dba", "finetuned+kreciprocal"]
    assert {m: after[m] for m in before} == before  # the plain rows are what they were
    test = load_embeddings(run / "embeddings" / "finetuned" / "test.npz")
    for method in ("aqe", "dba", "kreciprocal"):
        want = retrieval_metrics(test["embeddings"], test["labels"], ks=(1, 2, 4, 8), nmi=False,
                                 rerank=Rerank(method, n=3))
        assert after[f"finetuned+{method}"] == pytest.approx(want)
    assert "| finetuned+aqe |" in (run / "eval" / "report.md").read_text()
    assert "finetuned+kreciprocal" in proc.stderr  # the printed table
