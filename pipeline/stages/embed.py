"""embed: the frozen encoder over every split -> run_dir/embeddings/frozen/<split>.npz (the zero-shot baseline).

Runs on every rank: each embeds its share of each split's shards. Finished shards are kept in
run_dir/embeddings/frozen.parts/ (tagged with the settings that made them), so a rerun after a
crash embeds only what is missing; rank 0 writes the merged files, then removes the parts.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil

from pipeline.config import Config
from pipeline.data.transforms import eval_transform
from pipeline.parallel import distributed
from pipeline.eval.inference import embed_split, save_embeddings
from pipeline.models.encoders import build_encoder
from pipeline.run_context import RunContext
from pipeline.run_dir import RunDir, write_json

log = logging.getLogger(__name__)

DISTRIBUTED = True  # every rank embeds its shards (the runner starts it on all of them)


def _parts(cfg: Config, rd: RunDir):
    """The parts folder, emptied (on rank 0) unless it was made with these very settings."""
    parts = rd.root / "embeddings" / "frozen.parts"
    tag = {"model": dataclasses.asdict(cfg.model), "seed": cfg.seed, "shards": rd.run_id("shard"),
           "eval_resize": cfg.data.eval_resize}

    def check():
        if parts.exists() and (not (parts / "tag.json").is_file()
                               or json.loads((parts / "tag.json").read_text()) != json.loads(json.dumps(tag))):
            shutil.rmtree(parts)
        if not parts.exists():
            write_json(parts / "tag.json", tag)
        else:
            log.info("resuming: reusing the embedded shards in %s", parts)
    distributed.on_main(check)
    return parts


def run(cfg: Config, ctx: RunContext) -> None:
    rd = ctx.run
    model = build_encoder(cfg.model, cfg.seed).to(ctx.device)
    parts = _parts(cfg, rd)
    transform = eval_transform(cfg.model, cfg.data.eval_resize)
    for split in ctx.splits:
        data = embed_split(model, rd.shards / split, transform, cfg.eval.batch_size, ctx.device,
                           desc=f"embed {split}", workers=cfg.data.workers, parts=parts / split,
                           precision=cfg.train.precision)
        if ctx.world.is_main:
            save_embeddings(rd.embeddings("frozen") / f"{split}.npz", data)
            log.info("embed %s: %s", split, data["embeddings"].shape)
    distributed.barrier()
    if ctx.world.is_main:
        shutil.rmtree(parts)
