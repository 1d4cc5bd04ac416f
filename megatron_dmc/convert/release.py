"""Megatron-LM "torch" checkpoints, as the NVIDIA DMC release ships them.

    ROOT/latest_checkpointed_iteration.txt      "release" or an iteration number
    ROOT/{release|iter_0000123}/mp_rank_00/model_optim_rng.pt   (mp_rank_01... for TP)

Each file holds {"model": state dict with Megatron-Core Transformer-Engine names,
"args": argparse.Namespace, ...}. TP shards are merged here; pipeline-parallel files
(mp_rank_XX_YYY) and legacy `language_model.*` names are refused.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_dmc.convert.mapping import GATE_UP, Entry, entries, megatron_shape
from megatron_dmc.convert.release_args import dmc_from_args, shape_from_args
from megatron_dmc.schema.checkpoint import resolve_iteration_dir
from megatron_dmc.schema.llama import LlamaShape

MODEL_FILE = "model_optim_rng.pt"
IGNORED_SUFFIX = "._extra_state"
"""Transformer-Engine FP8/metadata state: no weights in it."""


class ReleaseCheckpoint:
    """A TensorSource over a Megatron-LM torch-format checkpoint (TP shards merged)."""

    def __init__(
        self, path: str | Path, vocab_size: int | None = None, trust_pickle: bool = False
    ) -> None:
        self.dir = resolve_iteration_dir(path)
        files = _rank_files(self.dir)
        states = [_load(f, trust_pickle) for f in files]
        self.args: argparse.Namespace = states[0]["args"]
        self.shards = [_model_state(state, f) for state, f in zip(states, files)]
        _check_tp_size(self.args, len(files))
        self.shape: LlamaShape = shape_from_args(self.args, vocab_size, _dtype(self.shards[0]))
        self.dmc = dmc_from_args(self.args)
        _check_tensors(self.shards, self.shape)

    def read(self, group: Sequence[Entry]) -> dict[str, torch.Tensor]:
        out = {}
        for entry in group:
            merged = merge_tp_shards(entry, [shard[entry.te] for shard in self.shards])
            out[entry.megatron] = merged[: megatron_shape(entry, self.shape)[0]]
        return out


def merge_tp_shards(entry: Entry, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Unshard one tensor: concatenate along the TP axis; gate/up are split per rank."""
    axis = entry.rule.tp_axis
    if axis is None or len(parts) == 1:
        return parts[0]
    if entry.rule.fuse == GATE_UP:
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(parts), dim=axis)


def _rank_files(iteration_dir: Path) -> list[Path]:
    rank_dirs = sorted(p for p in iteration_dir.glob("mp_rank_*") if p.is_dir())
    if not rank_dirs:
        raise ValueError(
            f"no mp_rank_* directories in {iteration_dir}: not a torch-format checkpoint"
        )
    if any(p.name.count("_") > 2 for p in rank_dirs):
        raise ValueError(
            f"{iteration_dir} is pipeline-parallel ({rank_dirs[-1].name}); only TP shards "
            "(mp_rank_00, mp_rank_01, ...) are merged: re-save it with pipeline size 1"
        )
    expected = [iteration_dir / f"mp_rank_{r:02d}" for r in range(len(rank_dirs))]
    if rank_dirs != expected:
        raise ValueError(f"TP shard directories {[p.name for p in rank_dirs]} are not contiguous")
    files = [d / MODEL_FILE for d in rank_dirs]
    if missing := [str(f) for f in files if not f.is_file()]:
        raise ValueError(f"missing {missing}")
    return files


def _load(path: Path, trust_pickle: bool) -> dict[str, Any]:
    """weights_only unpickling (tensors + argparse.Namespace) unless the user trusts it."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as error:
        if not trust_pickle:
            raise ValueError(
                f"{path} holds Python objects beyond tensors and argparse.Namespace ({error}); "
                "if you trust its source, pass --trust-checkpoint (full unpickling)"
            ) from None
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def _model_state(state: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    if "model" not in state:
        found = sorted(k for k in state if k.startswith("model"))
        raise ValueError(
            f"{path} has no 'model' state dict (found {found}; virtual PP unsupported)"
        )
    model = {k: v for k, v in state["model"].items() if not k.endswith(IGNORED_SUFFIX)}
    if legacy := sorted(k for k in model if k.startswith("language_model.")):
        raise ValueError(
            f"{path} uses legacy Megatron-LM names (e.g. {legacy[0]!r}); only Megatron-Core "
            "GPT names (decoder.layers.N.self_attention.linear_qkv...) are supported"
        )
    return model


def _check_tp_size(args: argparse.Namespace, files: int) -> None:
    declared = getattr(args, "tensor_model_parallel_size", files)
    if declared != files:
        raise ValueError(f"args say tensor_model_parallel_size={declared} but {files} shards exist")


def _dtype(shard: dict[str, torch.Tensor]) -> torch.dtype:
    return next(iter(shard.values())).dtype


def _check_tensors(shards: Sequence[dict[str, torch.Tensor]], shape: LlamaShape) -> None:
    """Names of every shard, and merged shapes against the args (before any data is read)."""
    expected = {e.te: e for e in entries(shape)}
    for shard in shards:
        if unknown := sorted(set(shard) - set(expected)):
            raise ValueError(
                f"release checkpoint has tensors the Llama mapping does not know: {unknown[:5]}"
            )
        if missing := sorted(set(expected) - set(shard)):
            raise ValueError(f"release checkpoint lacks tensors: {missing[:5]}")
    for name, entry in expected.items():
        got = _merged_shape(entry, [tuple(s[name].shape) for s in shards])
        want = megatron_shape(entry, shape)
        padded_ok = entry.rule.tp_axis == 0 and entry.layer is None and got[0] >= want[0]
        if got != want and not (padded_ok and got[1:] == want[1:]):
            raise ValueError(f"release tensor {name} merges to shape {got}; the args imply {want}")


def _merged_shape(entry: Entry, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    axis = entry.rule.tp_axis
    if axis is None:
        return shapes[0]
    return tuple(sum(s[axis] for s in shapes) if d == axis else n for d, n in enumerate(shapes[0]))
