"""Megatron-Core torch_dist checkpoints: write through a model's sharded_state_dict (any
TP/PP), read back into a model (any TP/PP), or stream unsharded tensors without a model."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megatron_dmc.convert.hf_io import copy_assets
from megatron_dmc.convert.mapping import (
    Entry,
    checkpoint_key,
    entries,
    entry_for_checkpoint_key,
    megatron_shape,
)
from megatron_dmc.model.lora import LORA_KEY, adapter_keys, is_adapter_key, merged_weight
from megatron_dmc.schema.checkpoint import (
    ASSETS_DIR,
    LATEST_FILE,
    METADATA_KEY,
    RELEASE,
    publish,
    resolve_iteration_dir,
    staging_path,
    upgraded_metadata,
)
from megatron_dmc.schema.llama import LlamaShape

CHECKPOINT_VERSION = 3.0
"""Megatron-LM's checkpoint_version for mcore dist checkpoints."""


class TensorSource(Protocol):
    """Unsharded Megatron tensors (local-spec names, real vocabulary rows) of one model."""

    shape: LlamaShape

    def read(self, group: Sequence[Entry]) -> dict[str, torch.Tensor]: ...


def fill_sharded_state_dict(sharded: dict[str, Any], source: TensorSource) -> None:
    """Copy each rank-local shard of `sharded` from the source's unsharded tensors.

    Reads one layer at a time, so peak extra memory is one unsharded layer.
    """
    by_layer: dict[int | None, list[ShardedTensor]] = {}
    for shard in _local_shards(sharded.values()):
        by_layer.setdefault(shard.global_offset[0] if shard.prepend_axis_num else None, []).append(
            shard
        )
    for layer, shards in by_layer.items():
        wanted = {s.key: entry_for_checkpoint_key(s.key, layer, source.shape) for s in shards}
        tensors = source.read(list(dict.fromkeys(wanted.values())))
        with torch.no_grad():
            for shard in shards:
                full = tensors[wanted[shard.key].megatron]
                full = _pad_rows(full, shard.global_shape[shard.prepend_axis_num])
                shard.data.copy_(full[_local_slices(shard)])


def _local_shards(values: Any) -> Iterator[ShardedTensor]:
    for value in values:
        if isinstance(value, ShardedTensorFactory):
            yield from _local_shards(_as_list(value.build()))
        elif isinstance(value, ShardedTensor):
            yield value
        elif isinstance(value, dict):
            yield from _local_shards(value.values())
        elif isinstance(value, list):
            yield from _local_shards(value)


def _as_list(built: Any) -> list[Any]:
    if isinstance(built, dict):
        return list(built.values())
    return built if isinstance(built, list) else [built]


def _local_slices(shard: ShardedTensor) -> tuple[slice, ...]:
    offsets = shard.global_offset[shard.prepend_axis_num :]
    return tuple(slice(o, o + n) for o, n in zip(offsets, shard.local_shape))


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Megatron may pad the vocabulary; padded rows are zero."""
    assert rows >= tensor.shape[0], (rows, tuple(tensor.shape))
    if rows == tensor.shape[0]:
        return tensor
    padding = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, padding])


def save_from_source(
    model: torch.nn.Module,
    source: TensorSource,
    save_dir: str | Path,
    metadata: dict[str, Any],
    assets_from: str | Path | None = None,
) -> None:
    """Collective over all ranks: fill `model` from `source`, then `save_model`."""
    sharded = model.sharded_state_dict()
    fill_sharded_state_dict(sharded, source)
    save_model(model, save_dir, metadata, assets_from, sharded=sharded)


def save_model(
    model: torch.nn.Module,
    save_dir: str | Path,
    metadata: dict[str, Any],
    assets_from: str | Path | None = None,
    sharded: dict[str, Any] | None = None,
) -> None:
    """Collective over all ranks: save `model` as SAVE/release, atomically.

    The caller has checked that `save_dir` is new (layout.check_new_directory); on
    failure only the staging directory `.NAME.partial` is left behind.
    """
    final = Path(save_dir)
    staging = staging_path(final)
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / RELEASE).mkdir(parents=True)
    dist.barrier()
    state = {
        "model": model.sharded_state_dict() if sharded is None else sharded,
        METADATA_KEY: metadata,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": 0,
    }
    dist_checkpointing.save(state, str(staging / RELEASE))
    dist.barrier()
    if dist.get_rank() == 0:
        (staging / LATEST_FILE).write_text(RELEASE + "\n")
        (staging / ASSETS_DIR).mkdir()
        if assets_from is not None and Path(assets_from).is_dir():
            copy_assets(assets_from, staging / ASSETS_DIR)
        publish(staging, final)
    dist.barrier()


def load_into_model(model: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """Collective: load a checkpoint into `model` at its own TP/PP (Megatron reshards);
    return the checkpoint's METADATA_KEY dict."""
    state = dist_checkpointing.load(
        {"model": model.sharded_state_dict()}, str(resolve_iteration_dir(path))
    )
    model.load_state_dict(state["model"], strict=True)
    return state.get(METADATA_KEY) or {}


@contextmanager
def process_group_of_one() -> Iterator[None]:
    """dist_checkpointing needs a process group even to read; make a private one if absent."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(str(Path(tmp) / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


class MegatronCheckpoint:
    """Stream unsharded tensors out of a torch_dist checkpoint, one layer at a time.

    Needs no model and no parallel groups; use as a context manager (it opens a
    one-process group if none exists). `shape` is required only when the checkpoint
    carries no METADATA_KEY.
    """

    def __init__(self, path: str | Path, shape: LlamaShape | None = None) -> None:
        self.dir = resolve_iteration_dir(path)
        self.root = Path(path)
        self._group = process_group_of_one()
        self._group.__enter__()
        try:
            self._open(shape)
        except BaseException:
            self.close()
            raise

    def _open(self, shape: LlamaShape | None) -> None:
        if dist.get_world_size() != 1:
            raise ValueError(
                "MegatronCheckpoint reads in one process (its loads are collective); "
                "inside a multi-rank job use load_into_model"
            )
        common = dist_checkpointing.load_common_state_dict(str(self.dir))
        self.metadata: dict[str, Any] = upgraded_metadata(common.get(METADATA_KEY) or {})
        if shape is None and "llama" not in self.metadata:
            raise ValueError(
                f"{self.dir} has no '{METADATA_KEY}' metadata; pass the model shape "
                "(--hf-config config.json) to export it"
            )
        self.shape = shape or LlamaShape.from_dict(self.metadata["llama"])
        self._tensors = dist_checkpointing.load_tensors_metadata(str(self.dir))
        _check_checkpoint_keys(self._tensors, self.shape)

    def close(self) -> None:
        self._group.__exit__(None, None, None)

    def __enter__(self) -> MegatronCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, group: Sequence[Entry]) -> dict[str, torch.Tensor]:
        """Unsharded tensors of `group`; LoRA adapters in the checkpoint are folded into
        their weights (`model.lora.merged_weight`), so the result is a plain model's."""
        requests = {}
        for entry in group:
            for key in (checkpoint_key(entry), *adapter_keys(checkpoint_key(entry), self._tensors)):
                requests[key] = self._request(key, entry.layer)
        loaded = dist_checkpointing.load(requests, str(self.dir), validate_access_integrity=False)
        out = {}
        for entry in group:
            key = checkpoint_key(entry)
            tensor = _layer(loaded[key], entry.layer)
            adapters = adapter_keys(key, self._tensors)
            if adapters:
                a, b = (_layer(loaded[k], entry.layer) for k in adapters)
                tensor = merged_weight(tensor, a, b, self.metadata[LORA_KEY]["scale"])
            out[entry.megatron] = tensor[: megatron_shape(entry, self.shape)[0]]
        return out

    def _request(self, key: str, layer: int | None) -> ShardedTensor:
        meta = self._tensors[key]
        if layer is None:
            data = torch.empty(meta.global_shape, dtype=meta.dtype)
            return ShardedTensor.from_rank_offsets(meta.key, data, replica_id=0)
        data = torch.empty((1, *meta.global_shape[1:]), dtype=meta.dtype)
        layers = meta.global_shape[0]
        return ShardedTensor.from_rank_offsets(meta.key, data, (0, layer, layers), replica_id=0)


def _layer(tensor: torch.Tensor, layer: int | None) -> torch.Tensor:
    return tensor[0] if layer is not None else tensor


TRAINING_STATE_PREFIXES = ("optimizer.",)
"""Training checkpoints also hold optimizer moments; export reads the model tensors only."""


def _check_checkpoint_keys(tensors: dict[str, ShardedTensor], shape: LlamaShape) -> None:
    expected = {checkpoint_key(e): e for e in entries(shape, layers=[0])}
    model_keys = {
        k for k in tensors if not k.startswith(TRAINING_STATE_PREFIXES) and not is_adapter_key(k)
    }
    if unknown := sorted(model_keys - set(expected)):
        raise ValueError(f"checkpoint has tensors the Llama mapping does not know: {unknown[:5]}")
    if missing := sorted(set(expected) - model_keys):
        raise ValueError(f"checkpoint lacks tensors: {missing[:5]}")
    for key, entry in expected.items():
        want = megatron_shape(entry, shape)
        got = tuple(tensors[key].global_shape)
        if entry.layer is not None:
            want = (shape.num_hidden_layers, *want)
        vocab_padded = entry.layer is None and entry.rule.tp_axis == 0 and got[0] > want[0]
        if got != want and not (vocab_padded and got[1:] == want[1:]):
            raise ValueError(
                f"checkpoint tensor {key} has shape {got}; the model shape implies {want}"
            )
