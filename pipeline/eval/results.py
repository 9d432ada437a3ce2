"""The eval stage's results: metrics per model and evaluation, diagnostics, figures and the report,
written to run_dir/eval/ through a temporary folder swapped in when complete."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline import tracking
from pipeline.config import Config
from pipeline.data.shards import ShardIndex
from pipeline.parallel import checkpoint
from pipeline.errors import UserError
from pipeline.eval import plots, report, sources
from pipeline.eval.diagnostics import embedding_diagnostics, singular_values
from pipeline.eval.failures import failures
from pipeline.eval.inference import load_embeddings
from pipeline.eval.metrics import retrieval_metrics
from pipeline.eval.rerank import Rerank
from pipeline.eval.retrievals import retrieval_layout
from pipeline.protocols import Evaluation, Protocol
from pipeline.run_dir import RunDir, fresh_dir, replace_dir, write_json

log = logging.getLogger(__name__)


def score(name: str, proto: Protocol, data: dict[str, dict], nmi: bool, rerank: Rerank | None = None) -> dict[str, dict]:
    """Evaluation name -> retrieval metrics of one model (its neighbour lists re-ranked by `rerank`)."""
    out = {}
    for e in proto.evaluations:
        q = data[e.query]
        gallery = (data[e.gallery]["embeddings"], data[e.gallery]["labels"]) if e.gallery else (None, None)
        try:
            out[e.name] = retrieval_metrics(q["embeddings"], q["labels"], *gallery, ks=proto.ks, nmi=nmi,
                                            rerank=rerank)
        except ValueError as err:
            raise UserError(f"{name} embeddings of {e.query}: {err}") from None
    return out


def write_results(cfg: Config, rd: RunDir, proto: Protocol, splits: list[str], sources: dict[str, str]) -> None:
    results, diagnostics, spectra, shown = {}, {}, {}, {}
    first = proto.evaluations[0]
    for name in cfg.eval.models:
        data = {}
        for split in splits:
            path = rd.embeddings(name) / f"{split}.npz"
            if not path.is_file():
                raise UserError(f"{path} is missing; run stage=embed force=true")
            data[split] = load_embeddings(path)
        results[name] = score(name, proto, data, cfg.eval.nmi)
        for method in cfg.eval.rerankings():  # beside the plain kNN row, never instead of it
            results[f"{name}+{method}"] = score(name, proto, data, False, Rerank.of(method, cfg.rerank))
        shown[name] = {s: data[s] for s in (first.query, first.gallery) if s}  # for retrievals.png
        if cfg.eval.diagnostics:
            diagnostics[name] = {s: embedding_diagnostics(d["embeddings"], d["labels"]) for s, d in data.items()}
            spectra.update({(name, s): (singular_values(d["embeddings"]), diagnostics[name][s]["rho"])
                            for s, d in data.items()})
    tmp = fresh_dir(rd.eval.with_name("eval.tmp"))
    plots.recall_at_k(results, list(proto.ks), tmp / "recall_at_k.png")
    if spectra:
        plots.spectrum(spectra, tmp / "spectrum.png")
        write_json(tmp / "diagnostics.json", diagnostics)
    drew_retrievals = cfg.eval.show_queries > 0 and cfg.eval.show_k > 0
    if drew_retrievals:
        draw_retrievals(cfg, rd, first, shown, tmp)
    last = cfg.eval.models[-1]  # the page's "where it fails" view: the last model's, as retrievals.png ranks
    write_json(tmp / "failures.json", failures(first, shown[last], last))
    best = best_validation(rd)
    drew_training = draw_training(rd, best, cfg.train.best_metric, tmp)
    trained = [name for name in cfg.eval.models if trained_here(name, cfg, rd)]
    title = f"Evaluation: {cfg.data.name}, run `{rd.root}`"
    (tmp / "report.md").write_text(report.markdown(title, proto, results, sources, diagnostics or None,
                                                   best=best if trained else None, trained=trained,
                                                   retrievals_png=drew_retrievals, training_png=drew_training))
    flat = {name: by_eval[proto.evaluations[0].name] if len(proto.evaluations) == 1 else by_eval
            for name, by_eval in results.items()}
    write_json(tmp / "metrics.json", flat)
    replace_dir(tmp, rd.eval)
    for evaluation in results[cfg.eval.models[0]]:
        log.info("metrics on %s (%s):\n%s", evaluation, rd.eval / "metrics.json",
                 table({name: by_eval[evaluation] for name, by_eval in results.items()}))


def draw_retrievals(cfg: Config, rd: RunDir, evaluation: Evaluation, shown: dict, out: Path) -> None:
    """retrievals.png and its layout, retrievals.json; the images come from the shards."""
    indexes = {}
    for split in dict.fromkeys(s for s in (evaluation.query, evaluation.gallery) if s):
        indexes[split] = ShardIndex.load(rd.shards / split)
        if any(list(by_split[split]["keys"]) != indexes[split].keys for by_split in shown.values()):
            raise UserError(f"the embeddings of {split} do not match {rd.shards / split} (sharded again since?); "
                            f"rerun stage=eval force=true")
    layout = retrieval_layout(evaluation, shown, cfg.eval.show_queries, cfg.eval.show_k, cfg.seed)
    for row in layout["rows"]:  # the dataset's class names (imagefolder's folders), where it has them
        row["class"] = indexes[evaluation.query].class_name(row["label"])
    plots.retrievals(layout, lambda split, i: indexes[split].image(i), out / "retrievals.png")
    write_json(out / "retrievals.json", layout)


def best_validation(rd: RunDir) -> dict | None:
    """The validation state of the checkpoint `best` names (metric, split, value, step), if any."""
    path = checkpoint.best_checkpoint(rd.checkpoints)
    if path is None or not (path / "meta.json").is_file():
        return None
    return json.loads((path / "meta.json").read_text()).get("validation")


def draw_training(rd: RunDir, best: dict | None, metric: str, out: Path) -> bool:
    """training.png from the run's metrics.jsonl; False where the run directory has none."""
    path = tracking.metrics_path(rd)
    if not path.is_file():
        return False
    metric = best["metric"] if best else metric
    plots.training(tracking.read_metrics(path), metric, out / "training.png", best["step"] if best else None)
    return True


def trained_here(name: str, cfg: Config, rd: RunDir) -> bool:
    """Whether a model came from this run directory's training (its validation applies to it)."""
    if name == "finetuned":
        return cfg.eval.export is None
    return name == "checkpoint" and sources.resolve(cfg.eval.checkpoint, cfg, rd).data is not None  # the run's own


def table(results: dict[str, dict]) -> str:
    keys = [k for k in next(iter(results.values())) if not k.startswith("num_")]
    width = max(10, *(len(name) for name in results))  # 10 as always, wider for "finetuned+kreciprocal"
    lines = [f"{'model':<{width}}" + "".join(f"{k:>12}" for k in keys)]
    lines += [f"{name:<{width}}" + "".join(f"{m[k]:>12.4f}" if k in m else f"{'':>12}" for k in keys)
              for name, m in results.items()]
    return "\n".join(lines)
