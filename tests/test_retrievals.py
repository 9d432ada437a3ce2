"""eval/retrievals.png's layout against a brute-force search of the stored embeddings; the report's links."""
import json

import numpy as np
import pytest

from pipeline.eval.inference import load_embeddings
from pipeline.eval.retrievals import average_precision_at_r


def brute_force_ap(e: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AP@R of every query, leave-one-out, by sorting all similarities (NaN without a relevant item),
    and how far faiss's may be from it: the query's near-ties (neighbours in its first R + 1 results,
    one of its class and one not, whose similarities are within float32 rounding, 1e-6, of each
    other) may come in either order there, each swap moving AP@R by at most 1 / R."""
    sims = e.astype(np.float64) @ e.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    ap, slack = np.full(len(e), np.nan), np.zeros(len(e))
    for q in range(len(e)):
        r = int((labels == labels[q]).sum()) - 1
        if r == 0:
            continue
        order = np.argsort(-sims[q], kind="stable")[:r + 1]
        rel = labels[order] == labels[q]
        close = np.abs(np.diff(sims[q][order])) < 1e-6
        slack[q] = (close & (rel[1:] != rel[:-1])).sum() / r
        rel = rel[:r]
        ap[q] = (np.cumsum(rel) / np.arange(1, r + 1) * rel).sum() / r
    return ap, slack


@pytest.fixture(scope="module")
def layout(digits_run):
    return json.loads((digits_run / "eval" / "retrievals.json").read_text())


def test_one_row_per_query_and_k_plus_one_tiles(layout):
    assert layout["k"] == 5 and layout["query_split"] == layout["gallery_split"] == "test"
    assert [row["kind"] for row in layout["rows"]] == ["random"] * 4 + ["worst"] * 4
    assert len({row["index"] for row in layout["rows"]}) == 8
    assert list(layout["models"]) == ["frozen", "finetuned"]
    for rows in layout["models"].values():
        assert len(rows) == 8 and all(len(results) + 1 == 6 for results in rows)  # the query + k results


def test_results_are_the_nearest_and_frames_match_the_labels(digits_run, layout):
    for model, rows in layout["models"].items():
        stored = load_embeddings(digits_run / "embeddings" / model / "test.npz")
        e, labels = stored["embeddings"], stored["labels"]
        for row, results in zip(layout["rows"], rows):
            q = row["index"]
            assert row["label"] == labels[q] and row["key"] == stored["keys"][q]
            sims = e @ e[q]
            sims[q] = -np.inf
            best = np.sort(sims)[::-1][:5]
            got = [hit["similarity"] for hit in results]
            assert got == pytest.approx(best, abs=1e-5)  # the 5 nearest, nearest first, the query left out
            for hit in results:
                assert hit["index"] != q and hit["similarity"] == pytest.approx(float(sims[hit["index"]]), abs=1e-5)
                assert hit["label"] == labels[hit["index"]] and hit["key"] == stored["keys"][hit["index"]]
                assert hit["frame"] == ("green" if labels[hit["index"]] == labels[q] else "red")
        frames = [hit["frame"] for results in rows for hit in results]
        assert "green" in frames and "red" in frames


def test_worst_queries_have_the_lowest_average_precision(digits_run, layout):
    stored = load_embeddings(digits_run / "embeddings" / "finetuned" / "test.npz")
    ap = average_precision_at_r(stored["embeddings"], stored["labels"])
    expected, slack = brute_force_ap(stored["embeddings"], stored["labels"])
    scored = ~np.isnan(expected)
    assert np.array_equal(scored, ~np.isnan(ap))
    assert (np.abs(ap - expected)[scored] <= slack[scored] + 1e-9).all()  # exact where nothing is tied
    map_r = json.loads((digits_run / "eval" / "metrics.json").read_text())["finetuned"]["map@r"]
    assert np.nanmean(ap) == pytest.approx(map_r, abs=1e-6)  # the eval stage's MAP@R is their mean
    shown = [row["index"] for row in layout["rows"] if row["kind"] == "random"]
    worst = [row["index"] for row in layout["rows"] if row["kind"] == "worst"]
    others = np.setdiff1d(np.flatnonzero(~np.isnan(ap)), shown)
    assert sorted(ap[worst]) == pytest.approx(sorted(ap[others])[:4], abs=1e-6)
    for row in layout["rows"]:
        assert row["average_precision"] == pytest.approx(ap[row["index"]], abs=1e-6)


def test_report_links_every_figure_and_the_best_validation(digits_run):
    report = (digits_run / "eval" / "report.md").read_text()
    for png in ("recall_at_k.png", "spectrum.png", "retrievals.png", "training.png"):
        assert f"({png})" in report
    best = json.loads((digits_run / "checkpoints" / "step_6" / "meta.json").read_text())["validation"]
    assert "| best val step | best val/recall@1 |" in report
    assert f"| {best['step']} | {best['value']:.4f} |" in report and best["step"] == 6
    assert "exported model" in report and "step 6)" in report  # export/source.json: which checkpoint
