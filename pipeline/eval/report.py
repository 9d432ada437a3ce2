"""The eval stage's Markdown report: retrieval metrics per model, finetuned minus frozen, the best
validation of the run, diagnostics, and every figure of the eval folder."""
from __future__ import annotations

from pipeline.protocols import Protocol


RERANKINGS = {"aqe": "alpha-query expansion", "dba": "database-side augmentation",
              "kreciprocal": "k-reciprocal re-ranking"}  # pipeline/eval/rerank.py


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def _describe(proto: Protocol) -> str:
    parts = [f"`{e.query}` leave-one-out" if e.gallery is None else f"`{e.query}` -> `{e.gallery}`"
             for e in proto.evaluations]
    return f"{'; '.join(parts)}; ks {', '.join(map(str, proto.ks))}"


def markdown(title: str, proto: Protocol, results: dict[str, dict[str, dict]], sources: dict[str, str],
             diagnostics: dict[str, dict[str, dict]] | None, best: dict | None = None, trained: list[str] = (),
             retrievals_png: bool = False, training_png: bool = False) -> str:
    """results: model -> evaluation -> metrics; diagnostics: model -> split -> rho/pi values; best:
    the run's best validation (pipeline.train.validation.Best's state), shown for the `trained` models."""
    lines = [f"# {title}", "", f"Protocol: {_describe(proto)}.", ""]
    lines += [f"- **{model}**: {source}" for model, source in sources.items()]
    reranked = sorted({m.split("+", 1)[1] for m in results if "+" in m})
    if reranked:
        lines += [f"- **<model>+{m}**: the model's neighbour lists re-ranked by {RERANKINGS[m]} (`eval.rerank`, "
                  "each query still left out of its own lists; NMI is the model's, not repeated)" for m in reranked]
    lines += [""]
    extra = ["best val step", f"best {best['metric']}"] if best else []
    for evaluation in next(iter(results.values())):
        metrics = [k for k, v in next(iter(results.values()))[evaluation].items() if not k.startswith("num_")]
        rows = [[model, *(by_eval[evaluation].get(k, "") for k in metrics),  # re-ranked rows: no clustering
                 *(([best["step"], best["value"]] if model in trained else ["", ""]) if best else [])]
                for model, by_eval in results.items()]
        if "frozen" in results and "finetuned" in results:
            f, t = results["frozen"][evaluation], results["finetuned"][evaluation]
            rows.append(["finetuned - frozen", *(f"{t[k] - f[k]:+.4f}" for k in metrics), *([""] * len(extra))])
        counts = next(iter(results.values()))[evaluation]
        lines += [f"## Retrieval: {evaluation}", "",
                  f"{counts['num_queries']} queries scored, {counts['num_excluded']} excluded (no other image of "
                  "their class in the gallery).", ""]
        lines += _table(["model", *metrics, *extra], rows) + [""]
    if best:
        lines += [f"Best validation: {best['metric']} {best['value']:.4f} on `{best['split']}` at step {best['step']} "
                  f"(`checkpoints/step_{best['step']}`, named by `checkpoints/best`).", ""]
        if best["split"] in proto.splits:  # the recipes select on test, as the papers' code did
            lines += [f"Selected on `{best['split']}`, a split this report scores: the selected checkpoint's figures "
                      "are optimistic (as the papers' are); a `checkpoint` row at the last step, where evaluated, "
                      "is the unselected figure.", ""]
    lines += ["![recall@k](recall_at_k.png)", ""]
    if retrievals_png:
        lines += ["## What the models retrieve", "",
                  "Seeded queries and the worst ones (lowest average precision), each with its nearest results: "
                  "green frames the query's class, red another; the number is the similarity "
                  "(layout in `retrievals.json`).", "", "![retrievals](retrievals.png)", ""]
    if training_png:
        lines += ["## Training", "", "Loss, learning rate and validation against the step, from "
                  "`logs/metrics.jsonl`.", "", "![training](training.png)", ""]
    if diagnostics:
        rows = [[model, split, d["rho"], d["pi_intra"], d["pi_inter"], d["pi_ratio"]]
                for model, by_split in diagnostics.items() for split, d in by_split.items()]
        lines += ["## Embedding space (Roth et al. 2020)", "",
                  "rho: KL divergence of the normalised singular-value spectrum from uniform (lower: more "
                  "directions used). pi_intra / pi_inter: mean cosine distance within classes / between "
                  "class centres; pi_ratio = pi_intra / pi_inter.", ""]
        lines += _table(["model", "split", "rho", "pi_intra", "pi_inter", "pi_ratio"], rows) + [""]
        lines += ["![singular-value spectrum](spectrum.png)", ""]
    return "\n".join(lines)
