"""Reading a config: dataclass defaults, then YAML presets, then a recipe, then the run's saved
config, then `key=value` overrides; every value's source is kept.

`data=cub` (a group name with a plain value) loads `presets/data/cub.yaml` over the defaults;
`data.root=/x` (a dotted key) sets one field. Unknown keys fail with the closest valid key, and
every value is checked (pipeline/config/schema.py) before the config is returned.

A run directory is an experiment: `resolve(args, run_dir=...)` starts from the run's saved
`config.yaml` (what its last command resolved) and applies only what this command gives: its
dotted keys, and the values of the presets and recipe it names. Precedence: defaults < presets <
recipe < the run's saved config < this command's presets, recipe and keys. Each value keeps the source
it was first set with (config_sources.json); a later command's own keys are labelled with its stage.
Per-command settings (PER_COMMAND, PER_COMMAND_SECTIONS: search, serve, plan, force, lock) are
neither saved with the run nor taken from it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import recipe as recipes
from pipeline.config.own_architecture import own_architecture
from pipeline.config.schema import Config, closest
from pipeline.errors import UserError
from pipeline.run_dir import write_json

PRESETS = Path(__file__).parent.parent / "presets"
GROUPS = ("data", "model", "parallel", "loss", "track")  # groups that presets fill
# Settings of one command, not of the experiment: never saved with the run nor taken from its saved
# config (where and what a search or a server answers, a plan of another cluster, force, lock).
PER_COMMAND = ("stage", "run_dir", "force", "lock")
PER_COMMAND_SECTIONS = ("search", "serve", "plan")
SAVED = "config.yaml"  # in the run directory
SOURCES = "config_sources.json"  # beside it: the presets the run was made with, each value's source
COMMAND_LINE = "command line"


@dataclass
class Resolved:
    """A config, where each value came from, and what this command itself set."""
    config: Config
    sources: dict[str, str]                         # leaf key -> default | preset g=x | recipe=x | run_dir | command line
    given: set[str] = field(default_factory=set)    # leaf keys this command set (keys, or its presets and recipe)
    saved: dict[str, Any] | None = None             # the run's saved config, flat (None: a new run directory)
    notes: list[str] = field(default_factory=list)  # decisions worth a log line (e.g. max_steps over epochs)
    presets: dict[str, str] = field(default_factory=dict)  # group -> the preset the values came from


def per_command(key: str) -> bool:
    """A key that only this command uses (PER_COMMAND, PER_COMMAND_SECTIONS)."""
    return key in PER_COMMAND or key.split(".", 1)[0] in PER_COMMAND_SECTIONS


def valid_keys(node: Any = Config, prefix: str = "") -> list[str]:
    """Every settable dotted key, e.g. 'train.max_steps'."""
    keys = []
    for f in dataclasses.fields(node):
        key = prefix + f.name
        keys.append(key)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += valid_keys(f.default_factory, key + ".")
    return keys


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (PRESETS / group).glob("*.yaml"))


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted leaf key: value}."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node)
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out = {}
    for k, v in node.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def _parse_args(args: list[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    chosen, overrides = {}, []
    for arg in args:
        if "=" not in arg:
            raise UserError(f"argument '{arg}' is not key=value (e.g. stage=all run_dir=runs/demo)")
        key, value = arg.split("=", 1)
        if key == "recipe":
            if value not in recipes.names():
                raise UserError(f"unknown recipe={value}; available: {', '.join(recipes.names())}")
            chosen[key] = value
        elif key in GROUPS:
            if value not in presets(key):
                raise UserError(f"unknown preset {key}={value}; available: {', '.join(presets(key))}")
            chosen[key] = value
        elif key in valid_keys():
            overrides.append((key, value))
        else:
            raise UserError(f"unknown config key '{key}'{closest(key, valid_keys())}")
    return chosen, overrides


def load_config(args: list[str]) -> Config:
    """The config of `args` alone (no run directory read): defaults < presets < recipe < key=value."""
    return resolve(args).config


def resolve(args: list[str], run_dir: Path | None = None) -> Resolved:
    """The config of `args`, over the saved config of `run_dir` where it has one (see the module doc)."""
    chosen, overrides = _parse_args(args)
    given_now = dict(chosen)  # the presets and recipe named on this command
    saved, saved_presets, saved_sources = _saved(run_dir)
    for group, name in saved_presets.items():
        chosen.setdefault(group, name)  # a recipe's `when` matches the presets the run was made with
    recipe = _recipe(chosen, given_now)
    cfg = OmegaConf.structured(Config)
    sources = dict.fromkeys(flatten(cfg), "default")
    given: set[str] = set()
    later: list[tuple[str, dict]] = []  # this command's presets: applied over the saved config
    for group in GROUPS:
        chosen[group] = chosen.get(group, getattr(cfg, group).name)
        preset = OmegaConf.load(PRESETS / group / f"{chosen[group]}.yaml")
        if saved is not None and group in given_now:
            later.append((f"preset {group}={chosen[group]}", {group: preset}))
            continue
        cfg = _merge(cfg, {group: preset}, f"preset {group}={chosen[group]}", sources)
    dotlist = _dotlist(overrides)
    probe = OmegaConf.merge(cfg, *[block for _, block in later], dotlist)
    if recipe is not None:
        label = f"recipe={chosen['recipe']}"
        for block in recipes.settings(recipe, chosen, probe):
            if saved is not None:
                later.append((label, block))
            else:
                cfg = _merge(cfg, block, label, sources, error=label)
        cfg.recipe = chosen["recipe"]
        sources["recipe"] = COMMAND_LINE if "recipe" in given_now else sources["recipe"]
    if saved is not None:
        kept = {k: v for k, v in saved.items() if not per_command(k)}
        cfg = _merge(cfg, kept, "run_dir", sources, flat=True)
        sources.update({k: saved_sources[k] for k in kept if k in saved_sources})  # where each was first set
        for label, block in later:
            given |= set(flatten(block))
            cfg = _merge(cfg, block, label, sources, error=label)
    before = (cfg.model.family, cfg.model.arch)  # what the presets and the run gave, for own_architecture
    cfg = OmegaConf.merge(cfg, dotlist)
    for key, _ in overrides:
        for leaf in [k for k in sources if k == key or k.startswith(key + ".")]:
            sources[leaf] = COMMAND_LINE
            given.add(leaf)
    config: Config = OmegaConf.to_object(cfg)
    notes = _explicit_steps_win(config, sources, overrides) + own_architecture(config, before, sources, COMMAND_LINE)
    if config.data.seed is None:  # resolved here, so that the saved config and the fingerprints say which
        config.data.seed = config.seed
    config.check()
    if saved is not None:  # a later command's own keys, marked as such
        sources.update({k: f"{sources[k]} (stage={config.stage})" for k in given if k in sources})
    chosen.pop("recipe", None)
    return Resolved(config, sources, given, saved, notes, chosen)


def _dotlist(overrides: list[tuple[str, str]]) -> DictConfig:
    for key, value in overrides:  # a value YAML cannot read ('...', '[1,') is named, not a traceback
        try:
            OmegaConf.from_dotlist([f"{key}={value}"])
        except yaml.YAMLError as e:
            raise UserError(f"bad value for '{key}': {value!r} is not a YAML value ({e.problem}); quote it") from None
    try:
        dotlist = OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides])
        OmegaConf.merge(OmegaConf.structured(Config), dotlist)
    except OmegaConfBaseException as e:
        raise UserError(f"bad value for '{e.full_key}': {e.msg.splitlines()[0]}") from None
    return dotlist


def _merge(cfg: DictConfig, block: dict, label: str, sources: dict[str, str], error: str | None = None,
           flat: bool = False) -> DictConfig:
    """cfg with `block` merged over it, each key it sets now from `label`."""
    nested = OmegaConf.from_dotlist([]) if flat else block
    if flat:
        for key, value in block.items():
            OmegaConf.update(nested, key, value, force_add=True)
    try:
        cfg = OmegaConf.merge(cfg, nested)
    except OmegaConfBaseException as e:
        raise UserError(f"{error or label}: {e.msg}") from None
    for key in flatten(nested):
        for leaf in [k for k in sources if k == key or k.startswith(key + ".")]:
            sources[leaf] = label
    return cfg


def _saved(run_dir: Path | None) -> tuple[dict | None, dict[str, str], dict[str, str]]:
    """The run's saved config (flat, known keys only), the presets it was made with and each value's source."""
    if run_dir is None or not (Path(run_dir) / SAVED).is_file():
        return None, {}, {}
    path = Path(run_dir) / SAVED
    try:
        saved = flatten(OmegaConf.load(path))
        made = json.loads((Path(run_dir) / SOURCES).read_text()) if (Path(run_dir) / SOURCES).is_file() else {}
        made_with, sources = made.get("presets", {}), made.get("sources", {})
    except (OmegaConfBaseException, yaml.YAMLError, OSError, ValueError, AttributeError) as e:
        raise UserError(f"{path} cannot be read ({e}); fix or remove it (it holds the run's settings)") from None
    known = set(valid_keys())
    return {k: v for k, v in saved.items() if k in known}, made_with, sources


def save(resolved: Resolved, run_dir: Path) -> None:
    """config.yaml (the resolved config, less the per-command settings: their defaults) and
    config_sources.json (the presets it was made with, and where each value came from), so that the
    next command on the run starts from them."""
    defaults = {f.name: getattr(Config(), f.name) for f in dataclasses.fields(Config)
                if f.name in PER_COMMAND_SECTIONS or f.name in ("force", "lock")}
    sources = {k: "default" if per_command(k) and k not in ("stage", "run_dir") else v
               for k, v in resolved.sources.items()}
    (Path(run_dir) / SAVED).write_text(to_yaml(dataclasses.replace(resolved.config, **defaults)))
    write_json(Path(run_dir) / SOURCES, {"presets": resolved.presets, "sources": sources})


def _recipe(chosen: dict[str, str], given_now: dict[str, str]) -> dict | None:
    """The chosen recipe's rules; its default loss preset becomes the loss unless loss= was given."""
    if given_now.get("recipe", "none") == "none":
        return None
    recipe = recipes.load(chosen["recipe"])
    if "loss" in recipe and "loss" not in given_now:
        chosen["loss"] = recipe["loss"]
        given_now["loss"] = recipe["loss"]
    return recipe


def _explicit_steps_win(config: Config, sources: dict[str, str], overrides: list[tuple[str, str]]) -> list[str]:
    """train.max_steps given on the command line beats train.epochs from a recipe or the run's config
    (the README's promise: a key given later wins); given both, the later of the two wins."""
    t = config.train
    if sources["train.max_steps"] != COMMAND_LINE or t.epochs is None:
        return []
    order = [k for k, _ in overrides if k in ("train.max_steps", "train.epochs")]
    if order[-1] == "train.epochs":
        return [f"train.epochs={t.epochs} given after train.max_steps={t.max_steps} decides the steps"]
    note = (f"train.max_steps={t.max_steps} from the command line wins over train.epochs={t.epochs} "
            f"(from {sources['train.epochs']})")
    t.epochs = None
    sources["train.epochs"] = COMMAND_LINE
    return [note]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
