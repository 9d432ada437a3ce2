"""eval: exact faiss kNN under the dataset's protocol, for each model in eval.models.

    frozen      the embed stage's embeddings (the encoder before finetuning)
    finetuned   run_dir/export (or the exported folder eval.export), embedded here
    checkpoint  eval.checkpoint (latest | best | step_<N> of run_dir/checkpoints, or a checkpoint folder), embedded here

Every rank embeds (pipeline/eval/inference.py shares the work across ranks); rank 0 saves the
embeddings and writes run_dir/eval/: metrics.json ({"frozen": {...}, "finetuned": {...}}; a
protocol with several evaluations, VehicleID, nests them: {"frozen": {"test800": {...}, ...}}),
diagnostics.json (Roth et al. per model and split), recall_at_k.png, spectrum.png,
retrievals.png (+ retrievals.json, its layout: pipeline/eval/retrievals.py), training.png (the run's
logs/metrics.jsonl, where it has one) and report.md, which links them all.
"""
from __future__ import annotations

import json

from pipeline import protocols
from pipeline.config import Config
from pipeline.data.transforms import eval_transform
from pipeline.parallel import distributed
from pipeline.parallel.distributed import pick_device, world_from_env
from pipeline.eval.inference import embed_split, save_embeddings
from pipeline.eval.results import write_results
from pipeline.eval.sources import load_model
from pipeline.run_dir import RunDir

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
                               device, desc=f"embed {split} ({name})", workers=cfg.data.workers,
                               precision=cfg.train.precision)
            if world_from_env().is_main:
                save_embeddings(rd.embeddings(name) / f"{split}.npz", data)
    distributed.on_main(lambda: write_results(cfg, rd, proto, splits, sources))
