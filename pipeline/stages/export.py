"""export: a checkpoint (export.checkpoint: latest by default, best, step_<N>) -> run_dir/export/model.safetensors + config.json (loadable without this pipeline's distributed code)."""
from __future__ import annotations

import logging

from pipeline.config import Config
from pipeline.parallel import checkpoint
from pipeline.eval.sources import own_data
from pipeline.models import lora
from pipeline.models.encoders import architecture, build_encoder, export
from pipeline.run_dir import RunDir, fresh_dir, replace_dir, write_json

log = logging.getLogger(__name__)


def run(cfg: Config, rd: RunDir) -> None:
    chosen = checkpoint.find(cfg.export.checkpoint, rd.checkpoints)
    model = build_encoder(cfg.model, cfg.seed)
    meta = checkpoint.load_weights(chosen, model, expect_model=architecture(cfg.model),
                                   expect_data=own_data(cfg, rd, chosen))
    model, plain = lora.merge(model, cfg.model)  # an export is a plain model of its library: adapters merged
    tmp = fresh_dir(rd.export.with_name("export.tmp"))
    export(model, plain, tmp)
    if cfg.export.onnx:  # model.onnx, checked against torch, + its preprocessing in config.json
        from pipeline.search import onnx_export
        onnx_export.write(model, plain, tmp, cfg.data.eval_resize)
    write_json(tmp / "source.json", {"checkpoint": str(chosen.resolve()), "step": meta["step"]})  # for the report
    replace_dir(tmp, rd.export)
    log.info("exported %s (export.checkpoint=%s) -> %s", chosen.name, cfg.export.checkpoint,
             rd.export / "model.safetensors")
