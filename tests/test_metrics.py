"""Tests of pipeline.metrics.retrieval_metrics: hand-worked cases and pytorch-metric-learning parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pipeline.eval import metrics
from pipeline.eval.metrics import retrieval_metrics


def circle(*degrees: float) -> np.ndarray:
    """Unit vectors at these angles: neighbour order follows the angular distance."""
    rad = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


# Six points with all pairwise angular distances within a row distinct (no ties):
#   p0 0° A, p1 25° B, p2 60° A, p3 110° A, p4 170° B, p5 260° B
GALLERY = circle(0, 25, 60, 110, 170, 260)
GALLERY_LABELS = np.array([0, 1, 0, 0, 1, 1])


def test_leave_one_out_by_hand():
    # Neighbours (self removed), nearest first, and relevance (same label):
    #   q0 A: p1 B(25) p2 A(60) p5 B(100) p3 A(110) p4 B(170)  rel 0 1 0 1 0  R=2
    #   q1 B: p0 A(25) p2 A(35) p3 A(85)  p5 B(125) p4 B(145)  rel 0 0 0 1 1  R=2
    #   q2 A: p1 B(35) p3 A(50) p0 A(60)  p4 B(110) p5 B(160)  rel 0 1 1 0 0  R=2
    #   q3 A: p2 A(50) p4 B(60) p1 B(85)  p0 A(110) p5 B(150)  rel 1 0 0 1 0  R=2
    #   q4 B: p3 A(60) p5 B(90) p2 A(110) p1 B(145) p0 A(170)  rel 0 1 0 1 0  R=2
    #   q5 B: p4 B(90) p0 A(100) p1 B(125) p3 A(150) p2 A(160) rel 1 0 1 0 0  R=2
    # recall@1: q3, q5 -> 2/6; recall@2: all but q1 -> 5/6; recall@4: all -> 1.
    # AP@R over the top 2: [0,1] -> (1/2)(1/2) = 1/4; [1,0] -> (1/2)(1) = 1/2; [0,0] -> 0.
    #   q0 1/4, q1 0, q2 1/4, q3 1/2, q4 1/4, q5 1/2 -> 1.75 / 6
    # R-precision: 1/2 for all but q1 (0) -> 2.5 / 6
    m = retrieval_metrics(GALLERY, GALLERY_LABELS, ks=(1, 2, 4), nmi=False)
    assert m["recall@1"] == pytest.approx(2 / 6, abs=1e-12)
    assert m["recall@2"] == pytest.approx(5 / 6, abs=1e-12)
    assert m["recall@4"] == pytest.approx(1.0, abs=1e-12)
    assert m["map@r"] == pytest.approx(1.75 / 6, abs=1e-12)
    assert m["r_precision"] == pytest.approx(2.5 / 6, abs=1e-12)
    assert m["num_queries"] == 6 and m["num_excluded"] == 0
    assert "nmi" not in m and "ami" not in m


def test_query_to_gallery_by_hand():
    # qa 40° A: g1 B(15) g2 A(20) g0 A(40) g3 A(70) g4 B(130) g5 B(140); R=3, top 3 rel 0 1 1
    #   AP = (1/3)(1/2 + 2/3) = 7/18, RP = 2/3, recall@1 0, recall@2 1
    # qb 200° B: g4 B(30) g5 B(60) g3 A(90) g2 A(140) g0 A(160) g1 B(175); R=3, top 3 rel 1 1 0
    #   AP = (1/3)(1 + 1) = 2/3, RP = 2/3, recall@1 1
    # qc 90° label 7: absent from the gallery -> excluded
    # Nothing is removed in this mode, so R counts every gallery item of the label (3, not 2).
    queries = circle(40, 200, 90)
    m = retrieval_metrics(queries, np.array([0, 1, 7]), GALLERY, GALLERY_LABELS, ks=(1, 2), nmi=False)
    assert m["recall@1"] == pytest.approx(1 / 2, abs=1e-12)
    assert m["recall@2"] == pytest.approx(1.0, abs=1e-12)
    assert m["map@r"] == pytest.approx((7 / 18 + 2 / 3) / 2, abs=1e-12)
    assert m["r_precision"] == pytest.approx(2 / 3, abs=1e-12)
    assert m["num_queries"] == 2 and m["num_excluded"] == 1


def test_gallery_identical_to_queries_removes_nothing():
    # Query -> gallery with the gallery equal to the queries: each query finds itself first.
    m = retrieval_metrics(GALLERY, GALLERY_LABELS, GALLERY, GALLERY_LABELS, ks=(1,), nmi=False)
    assert m["recall@1"] == 1.0
    # R = 3 (itself included); every query's top 3 is itself plus its two nearest others:
    #   q0 [1,0,1] q1 [1,0,0] q2 [1,0,1] q3 [1,1,0] q4 [1,0,1] q5 [1,1,0]
    ap = {"101": (1 + 2 / 3) / 3, "100": 1 / 3, "110": 2 / 3}
    expected = np.mean([ap["101"], ap["100"], ap["101"], ap["110"], ap["101"], ap["110"]])
    assert m["map@r"] == pytest.approx(expected, abs=1e-12)


def test_self_excluded_by_index_with_duplicates():
    # p0 and p1 are the same vector with different labels: each must retrieve the other, not
    # itself. Dropping "the first neighbour" instead would keep one of them retrieving itself.
    #   p0 0° A, p1 0° B, p2 60° A, p3 65° A, p4 180° B, p5 185° B
    # recall@1: q0 -> p1 (B) miss, q1 -> p0 (A) miss, q2 <-> q3 and q4 <-> q5 hit -> 4/6.
    x = circle(0, 0, 60, 65, 180, 185)
    labels = np.array([0, 1, 0, 0, 1, 1])
    m = retrieval_metrics(x, labels, ks=(1,), nmi=False)
    assert m["recall@1"] == pytest.approx(4 / 6, abs=1e-12)

    # Four copies of one vector (labels 0-3) and four distinct points at 100-130° (labels 0-3):
    # every item's nearest neighbours all have other labels, so every metric is 0 unless an item
    # retrieves itself. With k_search = 2 among four tied copies, the copy itself may not even be
    # returned by the search; the last column is dropped instead.
    x = np.concatenate([np.tile(circle(30), (4, 1)), circle(100, 110, 120, 130)])
    m = retrieval_metrics(x, np.array([0, 1, 2, 3, 0, 1, 2, 3]), ks=(1,), nmi=False)
    assert m["num_queries"] == 8
    assert m["recall@1"] == 0.0 and m["map@r"] == 0.0 and m["r_precision"] == 0.0


def test_singleton_class_excluded_and_counted():
    # p0 0° A, p1 50° A, p2 20° B (a singleton: R = 0, excluded, but still a gallery item).
    # q0: p2 B(20) p1 A(50) -> recall@1 0, recall@2 1, R=1 -> AP 0
    # q1: p2 B(30) p0 A(50) -> same
    m = retrieval_metrics(circle(0, 50, 20), np.array([0, 0, 1]), ks=(1, 2), nmi=False)
    assert m["num_excluded"] == 1 and m["num_queries"] == 2
    assert m["recall@1"] == 0.0 and m["recall@2"] == 1.0
    assert m["map@r"] == 0.0 and m["r_precision"] == 0.0


def test_all_queries_excluded_gives_nan():
    m = retrieval_metrics(circle(0, 90), np.array([0, 1]), nmi=False)
    assert m["num_queries"] == 0 and m["num_excluded"] == 2
    assert np.isnan(m["recall@1"]) and np.isnan(m["map@r"])


def clustered(rng, sizes, dim=16, noise=0.8):
    """Normalised embeddings around random class centres, overlapping enough to be imperfect."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    centres = rng.standard_normal((len(sizes), dim))
    x = centres[labels] + noise * rng.standard_normal((len(labels), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(len(labels))
    return x[perm].astype(np.float32), labels[perm]


def pml_metrics(query, query_labels, reference, reference_labels, ref_includes_query):
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
                              exclude=(), avg_of_avgs=False, k="max_bin_count", device=torch.device("cpu"))
    return calc.get_accuracy(query, query_labels, reference, reference_labels,
                             ref_includes_query=ref_includes_query)


def assert_matches_pml(ours, theirs):
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)


@pytest.mark.parametrize("chunk_rows", [4096, 7])
def test_leave_one_out_matches_pml(monkeypatch, chunk_rows):
    # chunk_rows=7 splits the queries into many chunks: self-removal must use global indices.
    monkeypatch.setattr(metrics, "CHUNK_ROWS", chunk_rows)
    rng = np.random.default_rng(0)
    sizes = [1, 1, 2, 3, 5, 8, 13, 21, 34, 40, 4, 9, 17, 2, 6]
    x, labels = clustered(rng, sizes)
    ours = retrieval_metrics(x, labels, ks=(1,), nmi=False)
    theirs = pml_metrics(x, labels, x, labels, ref_includes_query=True)
    assert ours["num_excluded"] == 2 and ours["num_queries"] == sum(sizes) - 2
    assert 0.2 < ours["map@r"] < 0.9          # neither trivial nor hopeless
    assert_matches_pml(ours, theirs)


@pytest.mark.parametrize("chunk_rows", [4096, 5])
def test_query_to_gallery_matches_pml(monkeypatch, chunk_rows):
    monkeypatch.setattr(metrics, "CHUNK_ROWS", chunk_rows)
    rng = np.random.default_rng(1)
    x, labels = clustered(rng, [3, 7, 12, 20, 30, 5, 9, 15, 4, 2])
    is_query = rng.random(len(labels)) < 0.4
    is_query[labels == 9] = True              # class 9 only among the queries: excluded
    q, ql, g, gl = x[is_query], labels[is_query], x[~is_query], labels[~is_query]
    ours = retrieval_metrics(q, ql, g, gl, ks=(1,), nmi=False)
    theirs = pml_metrics(q, ql, g, gl, ref_includes_query=False)
    assert ours["num_excluded"] == int(np.isin(ql, gl, invert=True).sum()) >= int((ql == 9).sum())
    assert_matches_pml(ours, theirs)


def test_recall_at_k_by_brute_force():
    rng = np.random.default_rng(2)
    x, labels = clustered(rng, [2, 3, 5, 8, 13, 6, 4], dim=8, noise=1.0)
    ks = (1, 2, 4, 8, 1000)                   # 1000 > gallery: sees every other item
    m = retrieval_metrics(x, labels, ks=ks, nmi=False)
    sim = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1)[:, :-1]  # self (at -inf) is last
    rel = labels[order] == labels[:, None]
    for k in ks:
        assert m[f"recall@{k}"] == pytest.approx(rel[:, :k].any(axis=1).mean(), abs=1e-12)


def test_torch_inputs_match_numpy():
    rng = np.random.default_rng(3)
    x, labels = clustered(rng, [4, 6, 8, 10])
    expected = retrieval_metrics(x, labels, nmi=False)
    got = retrieval_metrics(torch.from_numpy(x).double(), torch.from_numpy(labels), nmi=False)
    assert got == expected


def test_nmi_perfect_on_separated_clusters():
    rng = np.random.default_rng(4)
    centres = np.eye(8, dtype=np.float32)[:5]
    labels = np.repeat(np.arange(5), 12)
    x = centres[labels] + 0.01 * rng.standard_normal((len(labels), 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    m = retrieval_metrics(x, labels)
    assert m["nmi"] == pytest.approx(1.0, abs=1e-9)
    assert m["ami"] == pytest.approx(1.0, abs=1e-9)
    assert m["recall@1"] == 1.0 and m["map@r"] == 1.0


def test_nmi_low_on_random_labels():
    rng = np.random.default_rng(5)
    x, _ = clustered(rng, [20, 20, 20])
    m = retrieval_metrics(x, rng.integers(0, 3, size=len(x)))
    assert 0.0 <= m["nmi"] < 0.3 and m["ami"] < 0.3


X = circle(0, 10, 20, 30)
Y = np.array([0, 0, 1, 1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(query=X, query_labels=Y[:3]), "3 labels but there are 4 embedding rows"),
    (dict(query=X, query_labels=Y, gallery=X), "gallery and gallery_labels must be given together"),
    (dict(query=X, query_labels=Y, gallery_labels=Y), "gallery and gallery_labels must be given together"),
    (dict(query=X, query_labels=Y, gallery=X, gallery_labels=Y[:2]), "gallery_labels has 2 labels"),
    (dict(query=X, query_labels=Y, gallery=np.ones((4, 3), np.float32), gallery_labels=Y), "dim 2 differs"),
    (dict(query=np.where(np.eye(4, 2) > 0, np.nan, X), query_labels=Y), "query contains NaN or inf"),
    (dict(query=X, query_labels=Y, gallery=X + np.inf, gallery_labels=Y), "gallery contains NaN or inf"),
    (dict(query=np.zeros((0, 2), np.float32), query_labels=np.zeros(0)), "query is empty"),
    (dict(query=X[0], query_labels=Y[:1]), "2-D"),
    (dict(query=X, query_labels=Y + 0.5), "integer class ids"),
    (dict(query=X, query_labels=Y, ks=()), "ks must be"),
    (dict(query=X, query_labels=Y, ks=(0, 1)), "ks must be"),
])
def test_bad_input_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(**kwargs)


class RecordingIndex:
    """Wraps a faiss index and records the shape of every search."""

    def __init__(self, index):
        self.index, self.searches = index, []

    def search(self, x, k):
        self.searches.append((len(x), k))
        return self.index.search(x, k)


def test_memory_bounded_by_chunk_times_k(monkeypatch):
    rng = np.random.default_rng(6)
    x, labels = clustered(rng, [6, 9, 12, 7, 30, 16])
    expected = retrieval_metrics(x, labels, ks=(1, 4, 64), nmi=False)
    made = []
    build = metrics.flat_ip_index
    monkeypatch.setattr(metrics, "flat_ip_index", lambda g, k: made.append(RecordingIndex(build(g, k))) or made[-1])
    monkeypatch.setattr(metrics, "_MAX_CHUNK_ELEMENTS", 500)
    got = retrieval_metrics(x, labels, ks=(1, 4, 64), nmi=False)
    assert got == pytest.approx(expected, abs=1e-12)
    searches = made[0].searches
    assert sum(n for n, _ in searches) == len(x) and len(searches) > 1
    assert all(k == 65 and n * k <= 500 for n, k in searches)   # k = 64 + the query itself


def test_gpu_failure_falls_back_to_the_cpu(monkeypatch, caplog):
    """Where faiss sees a GPU but cannot use it (out of memory), search and k-means run on the CPU."""
    rng = np.random.default_rng(7)
    x, labels = clustered(rng, [5, 8, 11, 6])
    expected = retrieval_metrics(x, labels)

    def no_gpu_memory(*args, **kwargs):
        raise RuntimeError("Error: 'err == cudaSuccess' failed: out of memory")

    assign = metrics._kmeans_assign
    monkeypatch.setattr(metrics, "_use_gpu", lambda: True)
    monkeypatch.setattr(metrics, "_on_own_gpu", no_gpu_memory)  # the rank's own GPU (issue 26)
    monkeypatch.setattr(metrics, "_kmeans_assign", lambda x, n, gpu: no_gpu_memory() if gpu else assign(x, n, gpu))
    with caplog.at_level("WARNING"):
        got = retrieval_metrics(x, labels)
    assert got == expected
    assert "faiss GPU index failed" in caplog.text and "faiss GPU k-means failed" in caplog.text


def test_nan_found_in_any_block_with_its_row(monkeypatch):
    monkeypatch.setattr(metrics, "_FINITE_CHECK_ROWS", 3)
    x = np.tile(circle(0, 10, 20, 30), (3, 1))
    x[10, 0] = np.nan
    with pytest.raises(ValueError, match=r"query contains NaN or inf values \(row 10 is the first\)"):
        retrieval_metrics(x, np.arange(12) % 3)
