"""A sweep's figures (PNG, Agg), from its summary (pipeline/sweep/summary.py):

    summary.png   one panel per metric of the finetuned model: a bar per setting, error bar = std,
                  a dashed line at the frozen encoder's mean where the runs evaluated it
    batch.png     when train.global_batch is swept: each metric against the batch size, one line per
                  setting of the other grid words (mean, error bar = std)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.eval.plots import plt, save_figure


def _panels(n: int, width: float = 3.6, height: float = 3.0):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def _mean_std(stats: dict | None) -> tuple[float, float]:
    if stats is None:
        return np.nan, 0.0
    return stats["mean"], stats["std"] or 0.0


def bars(summary: dict, metrics: list[str], path: Path) -> None:
    settings = list(summary)
    fig, axes = _panels(len(metrics), width=max(3.6, 0.5 * len(settings) + 1.5), height=3.2 + 0.12 * max(
        len(s) for s in settings))
    x = np.arange(len(settings))
    for ax, metric in zip(axes, metrics):
        mean, std = zip(*(_mean_std(summary[s].get(metric)) for s in settings))
        ax.bar(x, mean, yerr=std, capsize=3, color=[f"C{i % 10}" for i in x])
        frozen = [_mean_std(summary[s].get(f"frozen/{metric}"))[0] for s in settings]
        if not np.isnan(frozen).all():  # the encoder before finetuning, for scale
            ax.hlines(frozen, x - 0.4, x + 0.4, colors="k", linestyles="--", label="frozen")
            ax.legend(fontsize=7)
        ax.set_xticks(x, settings, rotation=60, ha="right", fontsize=7)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def against_batch(summary: dict, settings_batch: dict[str, tuple[str, int]], metrics: list[str], path: Path) -> None:
    """settings_batch: setting -> (the setting without the batch word, batch size)."""
    fig, axes = _panels(len(metrics))
    lines = dict.fromkeys(rest for rest, _ in settings_batch.values())
    for ax, metric in zip(axes, metrics):
        for i, line in enumerate(lines):
            points = sorted((b, *_mean_std(summary[s].get(metric))) for s, (rest, b) in settings_batch.items()
                            if rest == line)
            b, mean, std = zip(*points)
            ax.errorbar(b, mean, yerr=std, marker="o", capsize=3, color=f"C{i % 10}", label=line or "all")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write(out: Path, summary: dict, metrics: list[str], batch: dict[str, tuple[str, int]]) -> list[str]:
    """The figures in `out` (batch.png when `batch`, setting -> (its other words, batch size), is given);
    their file names."""
    if not metrics:
        return []
    bars(summary, metrics, Path(out) / "summary.png")
    if not batch:
        return ["summary.png"]
    against_batch(summary, batch, metrics, Path(out) / "batch.png")
    return ["summary.png", "batch.png"]
