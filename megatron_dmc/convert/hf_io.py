"""Hugging Face model directories: a streaming safetensors reader and a sharded writer."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_dmc.convert.mapping import Entry, entries, hf_shapes, to_megatron
from megatron_dmc.schema.llama import (
    DTYPES,
    LlamaShape,
    llama_shape_from_hf,
    read_hf_config,
)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
"""Stored by some old exports; recomputed from rope_theta (transformers ignores them too)."""

ASSET_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template*",
)
"""Files copied through unchanged between HF directories (tokenizer and generation)."""

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class HFCheckpoint:
    """A Llama directory read tensor by tensor; `read` serves the Megatron tensors.

    Construction validates config and tensor names/shapes/dtypes, so nothing is written
    before a refusal.
    """

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        self.config = read_hf_config(self.dir)
        self.files = _tensor_files(self.dir)
        config_shape = llama_shape_from_hf(self.config)
        self.shape = LlamaShape.from_dict({**config_shape.to_dict(), "dtype": self._tensor_dtype()})
        self._check_tensors()

    def tensor(self, name: str) -> torch.Tensor:
        with safe_open(self.dir / self.files[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def read(self, group: Sequence[Entry]) -> dict[str, torch.Tensor]:
        return {
            e.megatron: to_megatron(e, [self.tensor(n) for n in e.hf], self.shape) for e in group
        }

    def _meta(self, name: str) -> tuple[tuple[int, ...], str]:
        with safe_open(self.dir / self.files[name], framework="pt") as handle:
            tensor_slice = handle.get_slice(name)
            return tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()

    def _tensor_dtype(self) -> str:
        dtypes = {name: self._meta(name)[1] for name in self.files}
        found = sorted(set(dtypes.values()))
        if len(found) != 1 or found[0] not in _SAFETENSORS_DTYPES:
            odd = next(
                n for n, d in dtypes.items() if d != found[0] or d not in _SAFETENSORS_DTYPES
            )
            raise ValueError(
                f"tensor dtypes {found} (e.g. {odd!r}): all weights must share one of "
                f"{list(_SAFETENSORS_DTYPES)}; re-save the model in one dtype"
            )
        return _SAFETENSORS_DTYPES[found[0]]

    def _check_tensors(self) -> None:
        expected = {}
        for entry in entries(self.shape):
            expected.update(zip(entry.hf, hf_shapes(entry, self.shape)))
        found = set(self.files)
        if unknown := sorted(found - set(expected)):
            raise ValueError(f"unknown tensors in {self.dir}: {unknown[:5]} (not a plain Llama)")
        if missing := sorted(set(expected) - found):
            raise ValueError(f"tensors missing from {self.dir}: {missing[:5]}")
        for name, want in expected.items():
            got = self._meta(name)[0]
            if got != want:
                raise ValueError(f"tensor {name} has shape {got} but config.json implies {want}")


def _tensor_files(hf_dir: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name, from the index or the single file."""
    if (hf_dir / INDEX_NAME).is_file():
        weight_map = json.loads((hf_dir / INDEX_NAME).read_text())["weight_map"]
    elif (hf_dir / SINGLE_NAME).is_file():
        with safe_open(hf_dir / SINGLE_NAME, framework="pt") as handle:
            weight_map = dict.fromkeys(handle.keys(), SINGLE_NAME)
    else:
        raise ValueError(
            f"no {SINGLE_NAME} or {INDEX_NAME} in {hf_dir}: only safetensors are read "
            "(re-save pytorch_model.bin checkpoints with save_pretrained)"
        )
    return {k: v for k, v in weight_map.items() if not k.endswith(IGNORED_SUFFIXES)}


def copy_assets(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy tokenizer/generation files (ASSET_PATTERNS) from src to dst; return their names."""
    src, dst = Path(src_dir), Path(dst_dir)
    names = sorted({p.name for pattern in ASSET_PATTERNS for p in src.glob(pattern) if p.is_file()})
    for name in names:
        shutil.copy2(src / name, dst / name)
    return names


def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy consecutive split of (name, nbytes) into shards of at most max_shard_bytes.

    A tensor larger than the limit gets a shard of its own (as transformers does).
    """
    shards: list[list[str]] = [[]]
    filled = 0
    for name, nbytes in sizes:
        if shards[-1] and filled + nbytes > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += nbytes
    return shards


def hf_tensor_sizes(shape: LlamaShape) -> list[tuple[str, int]]:
    """(HF name, bytes) of every weight, in the order the writer receives them."""
    itemsize = torch.empty((), dtype=DTYPES[shape.dtype]).element_size()
    sizes = []
    for entry in entries(shape):
        for name, dims in zip(entry.hf, hf_shapes(entry, shape)):
            sizes.append((name, itemsize * _numel(dims)))
    return sizes


def _numel(dims: Iterable[int]) -> int:
    count = 1
    for dim in dims:
        count *= dim
    return count


class ShardedSafetensorsWriter:
    """Receives tensors in planned order; writes each shard as soon as it is complete."""

    def __init__(self, out_dir: Path, shards: list[list[str]]) -> None:
        self.out_dir = out_dir
        self.shards = shards
        self.file_names = _shard_file_names(len(shards))
        self._next = 0
        self._buffer: dict[str, torch.Tensor] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        assert self._next < len(self.shards), f"{name} arrived after the last shard"
        assert name in self.shards[self._next], f"{name} arrived out of planned order"
        self._buffer[name] = tensor.contiguous()
        if len(self._buffer) == len(self.shards[self._next]):
            save_file(
                self._buffer, self.out_dir / self.file_names[self._next], metadata={"format": "pt"}
            )
            self._buffer = {}
            self._next += 1

    def finish(self, total_bytes: int) -> None:
        assert self._next == len(self.shards), "some planned tensors never arrived"
        if len(self.shards) == 1:
            return
        weight_map = {
            name: file for file, names in zip(self.file_names, self.shards) for name in names
        }
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
