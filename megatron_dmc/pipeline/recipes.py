"""Training recipes as data: `configs/recipes/<name>.yaml`, keys are `megatron_dmc.train`
flags exactly as in a `--config` file.

`paper` is the release's behaviour (channel decisions, zero_out, no delay, LM loss, every
weight trains); `efficient` is the sample-efficient retrofit (decision heads, merge delay,
distillation, frozen base). A preset names one (`train.recipe`); its `train.extra_args`
come after the recipe's flags on the command line, so they win.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

RECIPE_DIR = Path(__file__).resolve().parents[2] / "configs" / "recipes"
KV_METHODS = ("dmc", "dms")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    path = RECIPE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no recipe {name!r}; known recipes: {recipe_names()}")
    return path


def recipe_flags(name: str) -> list[str]:
    """The recipe as command-line words (`--flag=value`), checked by the trainer's parser."""
    from megatron_dmc.training.arguments import load_yaml_config

    path = recipe_path(name)
    load_yaml_config(path)  # unknown keys and bad values: a ValueError naming the file
    raw: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    flags = []
    for key, value in raw.items():
        flag = "--" + str(key).lstrip("-")
        if value is True:
            flags.append(flag)
        elif value is not False and value is not None:
            flags.append(f"{flag}={value}")
    return flags


def effective_values(recipe: str, extra_args: list[str]) -> dict[str, Any]:
    """Trainer field values the recipe sets, overridden by `extra_args` (as the launch
    applies them)."""
    from megatron_dmc.training.arguments import build_parser

    parser = build_parser(exit_on_error=False)
    try:
        namespace, unknown = parser.parse_known_args([*recipe_flags(recipe), *extra_args])
    except argparse.ArgumentError as error:
        raise ValueError(f"recipe {recipe!r} with extra_args {extra_args}: {error}") from error
    if unknown:
        raise ValueError(f"train.extra_args: unknown training flags {unknown}")
    parsed = vars(namespace)
    parsed.pop("config", None)
    parsed.pop("debug", None)
    return {k: v for k, v in parsed.items() if v is not None}


def uses_zero_out(values: dict[str, Any]) -> bool:
    """The recipe repurposes a channel, so the zero_out stage runs first."""
    return values.get("dmc_decision_source", "channel") == "channel"
