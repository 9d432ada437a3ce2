"""One road from a model spec to a model, for export, eval, index and search alike.

    frozen       the encoder before finetuning (model.*, its pretrained weights)
    finetuned    run_dir/export, the exported model
    latest | best | step_<N>    a checkpoint of this run (run_dir/checkpoints)
    <folder>     an exported folder (model.safetensors + config.json) or a checkpoint folder (meta.json)

`resolve` turns a spec into a `Source` and `load` turns a Source into the encoder in eval mode;
`load_spec` does both on every rank of a stage that runs on all of them (rank 0 looks at the files). A Source is also what index/meta.json records, so a
Searcher reloads the index's model through the same `load`. The one rule for which checkpoints are
the run's own: a checkpoint folder inside run_dir/checkpoints (the names latest, best and step_<N>
always are). Such a checkpoint must have been trained on the run's data (its meta.json's data
identity), wherever it is loaded from; a checkpoint from elsewhere may be evaluated on any data.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pipeline.config import Config, ModelConfig
from pipeline.errors import UserError
from pipeline.models.encoders import architecture, build_encoder, exported_config, is_exported, load_exported
from pipeline.parallel import checkpoint, distributed
from pipeline.parallel.checkpoint_names import names_run_checkpoint
from pipeline.run_dir import RunDir

FINETUNED, FROZEN = "finetuned", "frozen"
# What to do when run_dir/export is missing, per setting that asked for it (their error texts).
MISSING_EXPORT = {"eval.export": "{folder} is not an exported model (model.safetensors + config.json); "
                                 "run stage=export or set eval.export=<folder>",
                  "index.checkpoint": "{folder} holds no exported model; run stage=export or set index.checkpoint=latest"}


@dataclass(frozen=True)
class Source:
    kind: str                  # export | checkpoint | frozen
    path: str | None = None    # the folder; relative to the run directory when inside it
    model: dict | None = None  # checkpoint, frozen: the model config that builds the encoder
    seed: int = 0
    data: dict | None = None   # a checkpoint of the run: the data identity it must have been trained on

    def record(self) -> dict:
        """As index/meta.json keeps it: {"export": path} or {"checkpoint": path, "model", "seed", "data"}."""
        if self.kind == "export":
            return {"export": self.path}
        return {self.kind: self.path, "model": self.model, "seed": self.seed, "data": self.data}

    @classmethod
    def from_record(cls, record: dict) -> Source:
        kind = next(k for k in ("export", "checkpoint", "frozen") if k in record)
        return cls(kind, record[kind], record.get("model"), record.get("seed", 0), record.get("data"))


@dataclass
class Loaded:
    model: nn.Module        # in eval mode, on the CPU
    config: ModelConfig     # for the input transform
    description: str        # for the eval report
    path: Path | None = None  # the checkpoint or export folder
    step: int | None = None   # a checkpoint's step


def resolve(spec: str, cfg: Config, rd: RunDir, key: str = "") -> Source:
    """The Source a spec names, for the setting `key` (its name prefixes errors)."""
    model = dataclasses.asdict(cfg.model)
    if spec == FROZEN:
        return Source(FROZEN, None, model, cfg.seed)
    folder = rd.export if spec == FINETUNED else Path(spec).expanduser()
    if spec == FINETUNED or key == "eval.export":
        if not is_exported(folder):
            raise UserError(MISSING_EXPORT.get(key, MISSING_EXPORT["eval.export"]).format(folder=folder))
        return Source("export", relative(folder, rd.root))
    if not names_run_checkpoint(spec) and is_exported(folder):
        return Source("export", relative(folder, rd.root))
    try:
        path = checkpoint.find(spec, rd.checkpoints)
    except UserError as e:
        raise UserError(f"{key}={spec}: {e}" if key else str(e)) from None
    own = rd.checkpoints.resolve() in path.resolve().parents
    return Source("checkpoint", relative(path, rd.root), model, cfg.seed, cfg.data.identity() if own else None)


def relative(path: Path, root: Path) -> str:
    """Inside the run directory: relative to it (the run directory can be moved); else absolute."""
    path, root = path.resolve(), root.resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def load(source: Source, root: Path) -> Loaded:
    """The encoder a Source names, in eval mode on the CPU; relative paths from the run directory `root`."""
    if source.kind == FROZEN:
        model_cfg = ModelConfig.from_dict(source.model)
        return Loaded(build_encoder(model_cfg, source.seed).eval(), model_cfg, "the encoder before finetuning")
    path = Path(root) / source.path
    if source.kind == "export":
        made = json.loads((path / "source.json").read_text()) if (path / "source.json").is_file() else None
        return Loaded(load_exported(path), exported_config(path), f"exported model `{path}`" + (
            f" (checkpoint `{made['checkpoint']}`, step {made['step']})" if made else ""), path)
    model_cfg = ModelConfig.from_dict(source.model)
    model = build_encoder(model_cfg, source.seed)
    meta = checkpoint.load_weights(path, model, expect_model=architecture(model_cfg), expect_data=source.data)
    return Loaded(model.eval(), model_cfg, f"checkpoint `{path}` (step {meta['step']})", path, meta["step"])


def load_spec(spec: str, cfg: Config, rd: RunDir, key: str = "") -> Loaded:
    """resolve + load on every rank (collective): rank 0 resolves, all load the same."""
    return load(distributed.on_main(lambda: resolve(spec, cfg, rd, key)), rd.root)

