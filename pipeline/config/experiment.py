"""A run directory is an experiment: a later command may not silently change what a finished stage
was made from, and its settings can be seen, with their sources, before anything runs."""
from __future__ import annotations

import difflib
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.config.inputs import AFFECTS, CLASS
from pipeline.config.loader import Resolved, flatten
from pipeline.config.schema import Config
from pipeline.errors import UserError
from pipeline.run_dir import names_run_checkpoint

# What the run's data and model are: the keys that change the shards, and the encoder's weights
# source and architecture (pipeline/models/encoders.py's ARCHITECTURE). A later command may not swap
# them under a finished stage; other model keys (drop_path, mean/std) re-run what they affect.
MODEL_IDENTITY = ("model.name", "model.family", "model.arch", "model.pretrained", "model.image_size",
                  "model.patch_size", "model.depth", "model.width", "model.heads", "model.global_pool",
                  "model.embed_dim", "model.head_norm")


def guarded(key: str) -> bool:
    return CLASS.get(key) == "shard" or key in MODEL_IDENTITY


def check_unchanged(resolved: Resolved, run_dir: Path, finished: set[str]) -> None:
    """Refuse, in one line, a key given now that changes an input of a finished stage of the run
    (its data, model or shards), unless force=true; `finished`: the stages with a completion marker."""
    if resolved.saved is None or resolved.config.force:
        return
    now = flatten(_as_dict(resolved.config))
    for key in sorted(resolved.given, key=lambda k: (not k.endswith(".name"), k)):  # data.name before its details
        if not guarded(key) or key not in resolved.saved or now[key] == resolved.saved[key]:
            continue
        stages = [s for s in AFFECTS[CLASS[key]] if s in finished]
        if stages:
            raise UserError(f"{key}={now[key]} would change the finished {stages[0]} stage of {run_dir} (made with "
                            f"{key}={resolved.saved[key]}); to redo it and the stages after it add force=true, or "
                            "use a new run_dir")


def describe(resolved: Resolved) -> str:
    """Every setting, one per line, with the source of each value that is not a default."""
    lines = []
    for key, value in flatten(_as_dict(resolved.config)).items():
        source = resolved.sources.get(key, "default")
        lines.append(f"{key}: {value}" + ("" if source == "default" else f"    # {source}"))
    return "\n".join(lines)


def _as_dict(config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config))


def run_dir_of(args: list[str]) -> Path:
    """The run directory a command names (the last run_dir=), or the default."""
    given = [a.split("=", 1)[1] for a in args if a.startswith("run_dir=")]
    return Path(given[-1] if given else Config.run_dir)


def finished_stages(run_dir: Path) -> set[str]:
    """The stages of the run with a completion marker."""
    return {p.stem for p in (Path(run_dir) / "stages").glob("*.json")}


def ignored_settings(resolved) -> list[str]:
    """Settings given now that do nothing in this command, each worth a warning."""
    cfg = resolved.config
    if "eval.checkpoint" in resolved.given and "checkpoint" not in cfg.eval.models:
        return [f"eval.checkpoint={cfg.eval.checkpoint} is only used with eval.models listing checkpoint "
                f"(e.g. eval.models=[frozen,finetuned,checkpoint]); eval.models={cfg.eval.models}"]
    return []


# Stages that only read a model this run trained. Not export: `stage=export` on a new run directory is
# how the finetune jobs (slurm/finetune_*.sh) train and export in one launch.
READS_MODEL = ("eval", "index", "search", "serve")


def _own(checkpoint: str | None) -> bool:
    """None (the run's export) or a checkpoint name of this run, not a path elsewhere."""
    return checkpoint is None or names_run_checkpoint(checkpoint)


def reads_own_model(cfg: Config) -> bool:
    """Whether the command's stage only reads a model trained in its run directory (not one from elsewhere)."""
    if cfg.stage == "eval":
        e = cfg.eval
        return ("finetuned" in e.models and e.export is None) or ("checkpoint" in e.models and _own(e.checkpoint))
    return cfg.stage in READS_MODEL and _own(cfg.index.checkpoint)


def check_run_exists(cfg: Config) -> None:
    """A stage that reads this run's finished model, on a run directory that does not exist, is most
    likely a mistyped name: refuse in one line, naming the closest existing one, instead of training
    the default run from scratch under the new name. Nothing is created."""
    root = Path(cfg.run_dir)
    if root.exists() or not reads_own_model(cfg):
        return
    parent = root.parent
    siblings = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    near = difflib.get_close_matches(root.name, siblings, n=1, cutoff=0.6)
    hint = f"did you mean run_dir={parent / near[0]}? " if near else ""
    raise UserError(f"run_dir={cfg.run_dir} does not exist, and stage={cfg.stage} reads a finished model; {hint}"
                    f"to start a new run use stage=all (or stage=finetune) run_dir={cfg.run_dir}")
