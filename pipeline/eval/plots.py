"""The eval stage's figures (PNG, matplotlib's Agg backend: no display needed).

    recall_at_k(results, ks, path)   recall@k against k, one line per model, one panel per evaluation
    spectrum(spectra, path)          normalised singular-value spectra (log scale), one line per model and split
    retrievals(layout, image, path)  queries and their top-k, framed green (same class) or red, per model
    training(records, metric, path)  loss, learning rate and a validation metric against the step
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.tracking import series  # noqa: E402

FRAME_COLOURS = {"green": "#2ca02c", "red": "#d62728", "query": "#1f77b4"}


def save_figure(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def recall_at_k(results: dict[str, dict[str, dict]], ks: list[int], path: Path) -> None:
    """results: model -> evaluation name -> metrics (with recall@k for every k in ks)."""
    evaluations = list(next(iter(results.values())))
    fig, axes = plt.subplots(1, len(evaluations), figsize=(4.5 * len(evaluations), 3.6), squeeze=False)
    for ax, evaluation in zip(axes[0], evaluations):
        for model, by_eval in results.items():
            m = by_eval[evaluation]
            ax.plot(ks, [m[f"recall@{k}"] for k in ks], marker="o", label=f"{model} (MAP@R {m['map@r']:.3f})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k")
        ax.set_ylabel("recall@k")
        ax.set_title(evaluation)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def spectrum(spectra: dict[tuple[str, str], tuple[np.ndarray, float]], path: Path) -> None:
    """spectra: (model, split) -> (singular values, rho). Plotted normalised to sum 1."""
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {}
    for (model, split), (s, rho) in spectra.items():
        colour = colours.setdefault(model, f"C{len(colours)}")
        ax.plot(np.arange(1, len(s) + 1), s / s.sum(), color=colour, linestyle="--" if split == "train" else "-",
                label=f"{model} {split} (rho {rho:.3f})")
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("normalised singular value")
    ax.set_title("embedding spectrum (flatter = lower rho)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def tile(ax, image: Image.Image, frame: str, title: str) -> None:
    ax.imshow(np.asarray(image.convert("RGB")))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color(FRAME_COLOURS[frame])
        spine.set_linewidth(3)
    ax.set_title(title, fontsize=7, pad=2)


def retrievals(layout: dict, image, path: Path) -> None:
    """layout: pipeline.eval.retrievals.retrieval_layout's; image(split, index) -> PIL image. One row per
    query; per model, k + 1 tiles: the query, then its results nearest first, with their similarity."""
    rows, models, k = layout["rows"], list(layout["models"]), layout["k"]
    width = k + 1
    fig, axes = plt.subplots(len(rows), len(models) * (width + 1) - 1, squeeze=False,
                             figsize=(1.05 * (len(models) * (width + 1) - 1), 1.2 * len(rows) + 0.6),
                             gridspec_kw={"width_ratios": ([1] * width + [0.25]) * (len(models) - 1) + [1] * width})
    for ax in axes.flat:
        ax.set_axis_off()
    for m, model in enumerate(models):
        first = m * (width + 1)
        left, right = axes[0, first].get_position(), axes[0, first + width - 1].get_position()
        fig.text((left.x0 + right.x1) / 2, left.y1 + 0.25 / fig.get_figheight(), model, ha="center", va="bottom",
                 fontsize=11, weight="bold")
        for r, (row, results) in enumerate(zip(rows, layout["models"][model])):
            query = axes[r, first]
            query.set_axis_on()
            name = row.get("class", f"class {row['label']}")  # the dataset's class name, where it has one
            tile(query, image(layout["query_split"], row["index"]), "query", f"{row['kind']}: {name}")
            for c, hit in enumerate(results, start=1):
                ax = axes[r, first + c]
                ax.set_axis_on()
                tile(ax, image(layout["gallery_split"], hit["index"]), hit["frame"], f"{hit['similarity']:.3f}")
    kinds = [row["kind"] for row in rows]
    fig.text(0.5, axes[0, 0].get_position().y1 + 0.6 / fig.get_figheight(),
             f"the top {k} results of {kinds.count('random')} seeded queries and of the {kinds.count('worst')} worst "
             f"(lowest average precision, {layout['ranked_by']}); green: the query's class", ha="center", fontsize=10)
    save_figure(fig, path)


def training(records: list[dict], metric: str, path: Path, best_step: int | None = None) -> None:
    """records: metrics.jsonl's. Three panels against the step: train/loss, the learning rates
    (train/lr*), and `metric` (a validation scalar, the best step marked) with val/recall@1."""
    fig, (loss, lr, val) = plt.subplots(1, 3, figsize=(13, 3.4))
    loss.plot(*series(records, "train/loss"), color="C0")
    loss.set_title("train/loss")
    for name in sorted({r["name"] for r in records if r["name"].startswith("train/lr")}):
        lr.plot(*series(records, name), label=name)
    lr.set_title("learning rate")
    lr.legend(fontsize=7)
    for name in dict.fromkeys(["val/recall@1", metric]):
        steps, values = series(records, name)
        val.plot(steps, values, marker="o", label=name)
        if name == metric and best_step in steps:
            val.plot([best_step], [values[steps.index(best_step)]], marker="*", markersize=14, color="gold",
                     markeredgecolor="black", linestyle="none", label=f"best (step {best_step})")
    val.set_title("validation" if any(r["name"].startswith("val/") for r in records) else "no validation logged")
    val.legend(fontsize=7)
    for ax in (loss, lr, val):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    save_figure(fig, path)
