"""eval: exact faiss kNN under the dataset's protocol, for each model in eval.models.

    frozen      the embed stage's embeddings (the encoder before finetuning)
    finetuned   run_dir/export (or the exported folder eval.export), embedded here
    checkpoint  eval.checkpoint (latest | best | step_<N> of run_dir/checkpoints, or a checkpoint folder), embedded here

Every rank embeds (pipeline/eval/inference.py shares the work across ranks); rank 0 saves the
embeddings and writes run_dir/eval/: metrics.json ({"frozen": {...}, "finetuned": {...}}; a
protocol with several evaluations, VehicleID, nests them: {"frozen": {"test800": {...}, ...}}),
diagnostics.json (Roth et al. per model and split), recall_at_k.png, spectrum.png,
retrievals.png (+ retrievals.json, its layout: pipeline/eval/retrievals.py), training.png (the run's
logs/metrics.jsonl, where it has one), report.md, which links them all, and failures.json (the last
model's queries whose top-1 is wrong, worst first: pipeline/eval/failures.py; stage=serve's page shows it).
"""
from __future__ import annotations

from pipeline.config import Config
from pipeline.data.transforms import eval_transform
from pipeline.eval import sources as models
from pipeline.eval.inference import embed_split, save_embeddings
from pipeline.eval.results import write_results
from pipeline.parallel import distributed
from pipeline.run_context import RunContext

DISTRIBUTED = True  # every rank embeds; metrics and files on rank 0


def run(cfg: Config, ctx: RunContext) -> None:
    rd, proto = ctx.run, ctx.checked_protocol()
    splits = proto.splits + (["train"] if cfg.eval.diagnostics and "train" in ctx.splits
                             and "train" not in proto.splits else [])
    sources = {}
    for name in cfg.eval.models:
        if name == "frozen":  # the embed stage's embeddings
            sources[name] = f"the encoder before finetuning (`{rd.embeddings('frozen')}`)"
            continue
        spec, key = spec_of(name, cfg)
        loaded = models.load_spec(spec, cfg, rd, key)
        sources[name] = loaded.description
        model = loaded.model.to(ctx.device)
        for split in splits:
            data = embed_split(model, rd.shards / split, eval_transform(loaded.config, cfg.data.eval_resize),
                               cfg.eval.batch_size, ctx.device, desc=f"embed {split} ({name})",
                               workers=cfg.data.workers, precision=cfg.train.precision)
            if ctx.world.is_main:
                save_embeddings(rd.embeddings(name) / f"{split}.npz", data)
    distributed.on_main(lambda: write_results(cfg, rd, proto, splits, sources))


def spec_of(name: str, cfg: Config) -> tuple[str, str]:
    """(the model spec, the setting that gave it) for an entry of eval.models."""
    if name == "finetuned":
        return (cfg.eval.export, "eval.export") if cfg.eval.export else (models.FINETUNED, "eval.export")
    return cfg.eval.checkpoint, "eval.checkpoint"
