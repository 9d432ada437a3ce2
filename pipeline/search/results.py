"""stage=search's picture, search/results.png: each query image, then its top-k gallery images with
their scores, drawn as eval/retrievals.png draws a row (pipeline/eval/plots.py); the frames are the query's
colour and, for results, green where the result's label is the most common label among the k."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
from PIL import Image

from pipeline.eval.plots import save_figure, tile  # the eval stage's tile and atomic save


def draw(queries: list[Image.Image], names: list[str], results: list[list[dict]], gallery_image, path: Path) -> None:
    """gallery_image(id) -> PIL image of a gallery item."""
    k = max((len(r) for r in results), default=0)
    fig, axes = plt.subplots(len(queries), k + 1, squeeze=False, figsize=(1.05 * (k + 1), 1.2 * len(queries) + 0.4))
    for ax in axes.flat:
        ax.set_axis_off()
    for r, (query, name, hits) in enumerate(zip(queries, names, results)):
        axes[r, 0].set_axis_on()
        tile(axes[r, 0], query, "query", Path(name).name[:18])
        majority = Counter(hit["label"] for hit in hits).most_common(1)[0][0] if hits else None
        for c, hit in enumerate(hits, start=1):
            axes[r, c].set_axis_on()
            tile(axes[r, c], gallery_image(hit["id"]), "green" if hit["label"] == majority else "red",
                  f"{hit['score']:.3f} ({hit.get('class', 'class ' + str(hit['label']))[:14]})")
    fig.suptitle(f"the top {k} results of each query; green: the most common class among them", fontsize=9)
    save_figure(fig, path)
