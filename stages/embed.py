"""embed: the frozen encoder over every split -> run_dir/embeddings/frozen/<split>.npz (the zero-shot baseline)."""
from __future__ import annotations

import json
import logging

from pipeline.config import Config
from pipeline.data.transforms import eval_transform
from pipeline.distributed import pick_device, world_from_env
from pipeline.encoders import build_encoder
from pipeline.inference import embed_split, save_embeddings
from pipeline.run_dir import RunDir

log = logging.getLogger(__name__)


def run(cfg: Config, rd: RunDir) -> None:
    device = pick_device(cfg.device, world_from_env())
    model = build_encoder(cfg.model, cfg.seed).to(device)
    splits = json.loads((rd.shards / "summary.json").read_text())["splits"]
    for split, info in splits.items():
        data = embed_split(model, rd.shards / split, eval_transform(cfg.model), cfg.eval.batch_size, device,
                           total=info["images"], desc=f"embed {split}")
        save_embeddings(rd.embeddings("frozen") / f"{split}.npz", data)
        log.info("embed %s: %s", split, data["embeddings"].shape)
