"""The models the eval stage embeds: an exported folder, or a checkpoint of this run or from elsewhere."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from pipeline.config import Config, ModelConfig
from pipeline.parallel import checkpoint, distributed
from pipeline.errors import UserError
from pipeline.models.encoders import architecture, build_encoder, exported_config, load_exported
from pipeline.run_dir import RunDir


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
    meta = checkpoint.load_weights(path, model, expect_model=architecture(cfg.model),
                                   expect_data=own_data(cfg, rd, path))
    return model.eval(), cfg.model, f"checkpoint `{path}` (step {meta['step']})"


def checkpoint_path(spec: str, rd: RunDir) -> Path:
    """eval.checkpoint: latest, best, step_<N> (in run_dir/checkpoints) or a checkpoint folder."""
    try:
        return distributed.on_main(lambda: checkpoint.find(spec, rd.checkpoints))  # rank 0 checks, all load the same
    except UserError as e:
        raise UserError(f"eval.checkpoint={spec}: {e}") from None


def own_data(cfg: Config, rd: RunDir, path: Path) -> dict | None:
    """The data a checkpoint of this run must have been trained on; None for one from elsewhere (a
    model from another dataset may be evaluated on this one)."""
    return cfg.data.identity() if rd.checkpoints.resolve() in path.resolve().parents else None
