"""Recipes (`recipe=<name>`): the settings a paper's released code uses, per dataset, model and loss.

A recipe file, `presets/recipe/<name>.yaml`, holds

    loss:  the loss preset used when the command line names none (`loss=` on the command line wins)
    rules: a list of {when: {...}, set: {...}}, applied in order

`set` is a partial config of any group (data, model, train, loss, ...). `when` matches the chosen
preset names (`data`, `model`, `loss`: e.g. `loss: margin_rho`, the preset, not loss.name) and any
dotted key's value after the presets and the command line's key=value (e.g. `model.image_size: 224`);
a list means any of them; a rule without `when` always applies. Precedence: defaults < presets <
recipe < key=value, so a key given on the command line always wins over the recipe.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

PRESETS = Path(__file__).parent.parent / "presets" / "recipe"


def names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load(name: str) -> dict:
    recipe = OmegaConf.to_container(OmegaConf.load(PRESETS / f"{name}.yaml"))
    recipe.setdefault("rules", [])
    return recipe


def _matches(when: dict[str, Any], chosen: dict[str, str], probe: DictConfig) -> bool:
    for key, wanted in when.items():
        value = chosen[key] if key in chosen else OmegaConf.select(probe, key, throw_on_missing=True)
        if value not in (wanted if isinstance(wanted, list) else [wanted]):
            return False
    return True


def settings(recipe: dict, chosen: dict[str, str], probe: DictConfig) -> list[dict]:
    """The `set` blocks of the rules that apply, in order. chosen: group -> preset name;
    probe: the config (presets + key=value) the conditions are evaluated on."""
    return [rule.get("set", {}) for rule in recipe["rules"] if _matches(rule.get("when", {}), chosen, probe)]
