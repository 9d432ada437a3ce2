"""export: the latest checkpoint -> run_dir/export/model.safetensors + config.json (loadable without this pipeline's distributed code)."""
from __future__ import annotations

import logging

from pipeline import checkpoint
from pipeline.config import Config
from pipeline.encoders import architecture, build_encoder, export
from pipeline.errors import UserError
from pipeline.run_dir import RunDir, fresh_dir, replace_dir

log = logging.getLogger(__name__)


def run(cfg: Config, rd: RunDir) -> None:
    last = checkpoint.latest(rd.checkpoints)
    if last is None:
        raise UserError(f"no checkpoint in {rd.checkpoints}; run stage=finetune first")
    model = build_encoder(cfg.model, cfg.seed)
    checkpoint.load_weights(last, model, expect_model=architecture(cfg.model))
    tmp = fresh_dir(rd.export.with_name("export.tmp"))
    export(model, cfg.model, tmp)
    replace_dir(tmp, rd.export)
    log.info("exported %s -> %s", last.name, rd.export / "model.safetensors")
