"""Command line and `--config run.yaml` -> `TrainConfig` (the command line wins).

Flags are generated from the config dataclasses: field `tensor_model_parallel_size`
is `--tensor-model-parallel-size`, its help is the docstring under the field. YAML keys
may be spelled either way (`seq-length` or `seq_length`); an unknown key is an error, and
every value goes through the command line's parser (its types, choices and messages).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import types
import typing
from collections.abc import Sequence
from pathlib import Path

import yaml

from megatron_dmc.cli_errors import Parser
from megatron_dmc.training.config import GROUPS, TrainConfig


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        named = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        if named and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def _scalar_type(annotation: object) -> type:
    hint = annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    assert hint in (int, float, str, bool), f"unsupported flag type {annotation!r}"
    return hint  # type: ignore[return-value]


def _add_field(group: argparse._ArgumentGroup, f: dataclasses.Field, hint: object, doc: str):
    flag = "--" + f.name.replace("_", "-")
    kind = _scalar_type(hint)
    if kind is bool:
        group.add_argument(flag, action="store_true", default=None, help=doc)
        return
    group.add_argument(
        flag, type=kind, default=None, choices=f.metadata.get("choices"), help=doc, metavar=None
    )


def build_parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m megatron_dmc.train",
        description="DMC retrofit of a Llama on Megatron-Core: zero_out -> retrofit -> finetune "
        "(or --dmc-stage plain: continued training with vanilla attention).",
        exit_on_error=exit_on_error,
    )
    parser.add_argument("--config", help="YAML file with any of the flags below (CLI wins)")
    for title, cls in GROUPS.items():
        group = parser.add_argument_group(title)
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            _add_field(group, f, hints[f.name], docs.get(f.name, ""))
    return parser


def _known_fields() -> dict[str, str]:
    return {f.name: title for title, cls in GROUPS.items() for f in dataclasses.fields(cls)}


def load_yaml_config(path: str | Path) -> dict[str, object]:
    """Flag values from a YAML mapping, keys normalised to field names, each value parsed
    by the command line's own parser (same types, choices and messages)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path}: not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    values = {str(k).lstrip("-").replace("-", "_"): v for k, v in data.items()}
    known = _known_fields()
    for key in sorted(set(values) - set(known)):
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {_flag(close[0])}?)" if close else "; see --help for the flags"
        raise ValueError(f"--config {path}: unknown key {_flag(key)[2:]!r}{hint}")
    parser = build_parser(exit_on_error=False)
    try:
        parsed = vars(parser.parse_args(_as_argv(parser, values, path)))
    except argparse.ArgumentError as error:
        raise ValueError(f"--config {path}: {error}") from error
    return {k: v for k, v in parsed.items() if k in values and v is not None}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _as_argv(parser: argparse.ArgumentParser, values: dict[str, object], path: Path) -> list[str]:
    """YAML values as the command-line words that would set them."""
    switches = {a.dest for a in parser._actions if a.nargs == 0}
    argv = []
    for name, value in values.items():
        flag = _flag(name)
        if value is None or (value is False and name in switches):
            continue
        if name in switches:
            if value is not True:
                raise ValueError(f"--config {path}: {flag} takes true or false; got {value!r}")
            argv.append(flag)
        elif isinstance(value, dict | list):
            raise ValueError(f"--config {path}: {flag} takes one value; got {value!r}")
        else:
            argv.append(f"{flag}={value}")
    return argv


def config_from_values(values: dict[str, object]) -> TrainConfig:
    """Build (and check) a TrainConfig from field values; missing fields take defaults."""
    owner = _known_fields()
    unknown = sorted(set(values) - set(owner))
    if unknown:
        raise ValueError(f"unknown settings {unknown}")
    groups: dict[str, dict[str, object]] = {title: {} for title in GROUPS}
    for name, value in values.items():
        if value is not None:
            groups[owner[name]][name] = value
    return TrainConfig(**{title: GROUPS[title](**kw) for title, kw in groups.items()})


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """The run's TrainConfig: defaults < --config YAML < command line."""
    parsed = vars(build_parser().parse_args(argv))
    config_path = parsed.pop("config")
    parsed.pop("debug", None)
    values = load_yaml_config(config_path) if config_path else {}
    values.update({k: v for k, v in parsed.items() if v is not None})
    return config_from_values(values)
