"""The eval stage's figures (PNG, matplotlib's Agg backend: no display needed).

    recall_at_k(results, ks, path)   recall@k against k, one line per model, one panel per evaluation
    spectrum(spectra, path)          normalised singular-value spectra (log scale), one line per model and split
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> None:
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
    _save(fig, path)


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
    _save(fig, path)
