"""Reading a config: dataclass defaults, then YAML presets, then a recipe, then `key=value` overrides.

`data=cub` (a group name with a plain value) loads `presets/data/cub.yaml` over the defaults;
`data.root=/x` (a dotted key) sets one field. Unknown keys fail with the closest valid key, and
every value is checked (pipeline/config/schema.py) before the config is returned.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import recipe as recipes
from pipeline.config.schema import Config, closest
from pipeline.errors import UserError

PRESETS = Path(__file__).parent.parent / "presets"
GROUPS = ("data", "model", "parallel", "loss", "track")  # groups that presets fill


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
    """Defaults < presets (data=, model=, parallel=, loss=) < recipe= < dotted overrides, validated
    against the dataclasses (see pipeline/config/recipe.py for how a recipe composes)."""
    chosen, overrides = _parse_args(args)
    recipe = _recipe(chosen)
    cfg = OmegaConf.structured(Config)
    for group in GROUPS:
        chosen[group] = chosen.get(group, getattr(cfg, group).name)
        preset = OmegaConf.load(PRESETS / group / f"{chosen[group]}.yaml")
        try:
            cfg = OmegaConf.merge(cfg, {group: preset})
        except OmegaConfBaseException as e:
            raise UserError(f"preset {group}={chosen[group]}: {e.msg}") from None
    for key, value in overrides:  # a value YAML cannot read ('...', '[1,') is named, not a traceback
        try:
            OmegaConf.from_dotlist([f"{key}={value}"])
        except yaml.YAMLError as e:
            raise UserError(f"bad value for '{key}': {value!r} is not a YAML value ({e.problem}); quote it") from None
    try:
        dotlist = OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides])
        probe = OmegaConf.merge(cfg, dotlist)
    except OmegaConfBaseException as e:
        raise UserError(f"bad value for '{e.full_key}': {e.msg.splitlines()[0]}") from None
    if recipe is not None:
        for block in recipes.settings(recipe, chosen, probe):
            try:
                cfg = OmegaConf.merge(cfg, block)
            except OmegaConfBaseException as e:
                raise UserError(f"recipe={chosen['recipe']}: {e.msg}") from None
        cfg.recipe = chosen["recipe"]
    cfg = OmegaConf.merge(cfg, dotlist)
    config: Config = OmegaConf.to_object(cfg)
    if config.data.seed is None:  # resolved here, so that the saved config and the fingerprints say which
        config.data.seed = config.seed
    config.check()
    return config


def _recipe(chosen: dict[str, str]) -> dict | None:
    """The chosen recipe's rules; its default loss preset becomes the loss unless loss= was given."""
    if chosen.get("recipe", "none") == "none":
        return None
    recipe = recipes.load(chosen["recipe"])
    if "loss" in recipe:
        chosen.setdefault("loss", recipe["loss"])
    return recipe


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
