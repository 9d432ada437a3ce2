"""export: a checkpoint (export.checkpoint: latest by default, best, step_<N>) -> run_dir/export/model.safetensors + config.json (loadable without this pipeline's distributed code)."""
from __future__ import annotations

import logging

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.eval import sources as models
from pipeline.models import lora
from pipeline.models.encoders import export
from pipeline.run_context import RunContext
from pipeline.run_dir import fresh_dir, replace_dir, write_json

log = logging.getLogger(__name__)


def run(cfg: Config, ctx: RunContext) -> None:
    rd = ctx.run
    loaded = models.load(models.resolve(cfg.export.checkpoint, cfg, rd), rd.root)  # rank 0 alone
    if loaded.step is None:
        raise UserError(f"export.checkpoint={cfg.export.checkpoint} is an exported model, not a checkpoint; "
                        "give latest, best, step_<N> or a checkpoint folder")
    chosen = loaded.path
    model, plain = lora.merge(loaded.model, loaded.config)  # an export is a plain model of its library: adapters merged
    tmp = fresh_dir(rd.export.with_name("export.tmp"))
    export(model, plain, tmp)
    if cfg.export.onnx:  # model.onnx, checked against torch, + its preprocessing in config.json
        from pipeline.search import onnx_export
        diff = onnx_export.write(model, plain, tmp, cfg.data.eval_resize)
    write_json(tmp / "source.json", {"checkpoint": str(chosen.resolve()), "step": loaded.step})  # for the report
    replace_dir(tmp, rd.export)
    log.info("exported %s (export.checkpoint=%s) -> %s", chosen.name, cfg.export.checkpoint,
             rd.export / "model.safetensors")
    if cfg.export.onnx:  # named where it is kept, not in export.tmp/
        log.info("ONNX: %s (onnxruntime vs torch: max abs difference %.1e)", rd.export / "model.onnx", diff)
