"""eval: exact faiss kNN under the dataset's protocol, for each model in eval.models.

    frozen      the embed stage's embeddings (the encoder before finetuning)
    finetuned   run_dir/export (or the exported folder eval.export), embedded here
    checkpoint  eval.checkpoint (latest | best | step_<N> of run_dir/checkpoints, or a checkpoint folder), embedded here

Every rank embeds (pipeline.inference.embed_split shares the work across ranks); rank 0 saves the
embeddings and writes run_dir/eval/: metrics.json ({"frozen": {...}, "finetuned": {...}}; a
protocol with several evaluations, VehicleID, nests them: {"frozen": {"test800": {...}, ...}}),
diagnostics.json (Roth et al. per model and split), recall_at_k.png, spectrum.png,
retrievals.png (+ retrievals.json, its layout: pipeline/retrievals.py), training.png (the run's
logs/metrics.jsonl, where it has one) and report.md, which links them all.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from pipeline import checkpoint, distributed, plots, protocols, report, tracking
from pipeline.config import Config, ModelConfig
from pipeline.data.shards import ShardIndex
from pipeline.data.transforms import eval_transform
from pipeline.diagnostics import embedding_diagnostics, singular_values
from pipeline.distributed import pick_device, world_from_env
from pipeline.encoders import architecture, build_encoder, exported_config, load_exported
from pipeline.errors import UserError
from pipeline.inference import embed_split, load_embeddings, save_embeddings
from pipeline.metrics import retrieval_metrics
from pipeline.protocols import Evaluation, Protocol
from pipeline.retrievals import retrieval_layout
from pipeline.run_dir import RunDir, fresh_dir, replace_dir, write_json

log = logging.getLogger(__name__)

DISTRIBUTED = True  # every rank embeds; metrics and files on rank 0


def run(cfg: Config, rd: RunDir) -> None:
    device = pick_device(cfg.device, world_from_env())
    available = json.loads((rd.shards / "summary.json").read_text())["splits"]
    proto = protocols.resolve(cfg.data.name, cfg.eval.ks, cfg.eval.split, cfg.eval.gallery)
    protocols.check_splits(proto, list(available), str(rd.shards))
    splits = proto.splits + (["train"] if cfg.eval.diagnostics and "train" in available
                             and "train" not in proto.splits else [])
    sources = {}
    for name in cfg.eval.models:
        if name == "frozen":
            sources[name] = f"the encoder before finetuning (`{rd.embeddings('frozen')}`)"
            continue
        model, model_cfg, sources[name] = load_model(name, cfg, rd)
        model.to(device)
        for split in splits:
            data = embed_split(model, rd.shards / split, eval_transform(model_cfg, cfg.data.eval_resize), cfg.eval.batch_size,
                               device, desc=f"embed {split} ({name})")
            if world_from_env().is_main:
                save_embeddings(rd.embeddings(name) / f"{split}.npz", data)
    distributed.on_main(lambda: write_results(cfg, rd, proto, splits, sources))


def load_model(name: str, cfg: Config, rd: RunDir) -> tuple[nn.Module, ModelConfig, str]:
    """The encoder to embed with, its config (for the input transform), and where it came from."""
    if name == "finetuned":
        folder = Path(cfg.eval.export).expanduser() if cfg.eval.export else rd.export
        if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
            raise UserError(f"{folder} is not an exported model (model.safetensors + config.json); "
                            "run stage=export or set eval.export=<folder>")
        model_cfg = exported_config(folder)
        source = folder / "source.json"
        made = json.loads(source.read_text()) if source.is_file() else None
        return load_exported(folder), model_cfg, f"exported model `{folder}`" + (
            f" (checkpoint `{made['checkpoint']}`, step {made['step']})" if made else "")
    path = checkpoint_path(cfg.eval.checkpoint, rd)
    model = build_encoder(cfg.model, cfg.seed)
    meta = checkpoint.load_weights(path, model, expect_model=architecture(cfg.model))
    return model.eval(), cfg.model, f"checkpoint `{path}` (step {meta['step']})"


def checkpoint_path(spec: str, rd: RunDir) -> Path:
    """eval.checkpoint: latest, best, step_<N> (in run_dir/checkpoints) or a checkpoint folder."""
    try:
        return distributed.on_main(lambda: checkpoint.find(spec, rd.checkpoints))  # rank 0 checks, all load the same
    except UserError as e:
        raise UserError(f"eval.checkpoint={spec}: {e}") from None


def score(name: str, proto: Protocol, data: dict[str, dict], nmi: bool) -> dict[str, dict]:
    """Evaluation name -> retrieval metrics of one model."""
    out = {}
    for e in proto.evaluations:
        q = data[e.query]
        gallery = (data[e.gallery]["embeddings"], data[e.gallery]["labels"]) if e.gallery else (None, None)
        try:
            out[e.name] = retrieval_metrics(q["embeddings"], q["labels"], *gallery, ks=proto.ks, nmi=nmi)
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
    return name == "checkpoint" and rd.checkpoints.resolve() in checkpoint.find(cfg.eval.checkpoint, rd.checkpoints).resolve().parents


def table(results: dict[str, dict]) -> str:
    keys = [k for k in next(iter(results.values())) if not k.startswith("num_")]
    lines = [f"{'model':<10}" + "".join(f"{k:>12}" for k in keys)]
    lines += [f"{name:<10}" + "".join(f"{m[k]:>12.4f}" for k in keys) for name, m in results.items()]
    return "\n".join(lines)
