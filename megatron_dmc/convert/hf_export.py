"""Write any TensorSource as an HF Llama (or DMC Llama) directory, streaming layer by layer."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megatron_dmc.convert.dmc_export import copy_modeling_files, dmc_fields, dmc_hf_config
from megatron_dmc.convert.hf_io import (
    ShardedSafetensorsWriter,
    copy_assets,
    hf_tensor_sizes,
    plan_shards,
    write_json,
)
from megatron_dmc.convert.mapping import entries, to_hf
from megatron_dmc.convert.megatron_io import TensorSource
from megatron_dmc.schema.checkpoint import atomic_directory
from megatron_dmc.schema.llama import hf_config_from_shape

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def write_hf_model(
    source: TensorSource,
    out_dir: str | Path,
    base_config: dict[str, Any] | None = None,
    dmc: dict[str, Any] | None = None,
    export_dmc: bool = False,
    assets_from: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Atomically write `out_dir`: sharded safetensors (+ index), config.json, assets.

    Weights keep the source's Llama names and shape.dtype; with `export_dmc` the config
    becomes a llama_dmc config carrying `dmc` and the modeling files are copied in.
    """
    shape = source.shape
    if shape.dmc_decision_heads and not export_dmc:
        raise ValueError(
            "this model has DMC decision heads: it exports only as a DMC Llama (the heads "
            "decide its compression); export it with DMC on"
        )
    if export_dmc and (dmc_fields(dmc)["decision_source"] == "heads") != shape.dmc_decision_heads:
        raise ValueError(
            f"the DMC metadata says decision_source={dmc_fields(dmc)['decision_source']!r} "
            f"but the checkpoint {'has' if shape.dmc_decision_heads else 'has no'} decision "
            "heads; fix the metadata (or the --hf-config given)"
        )
    config = hf_config_from_shape(shape, base_config)
    if export_dmc:
        config = dmc_hf_config(config, dmc)
    sizes = hf_tensor_sizes(shape)
    groups = [list(g) for _, g in itertools.groupby(entries(shape), key=lambda e: e.layer)]
    with atomic_directory(out_dir) as staging:
        writer = ShardedSafetensorsWriter(staging, plan_shards(sizes, max_shard_bytes))
        for group in tqdm(groups, desc="export", unit="layer"):
            tensors = source.read(group)
            for entry in group:
                hf_tensors = to_hf(entry, tensors[entry.megatron], shape)
                for name, tensor in zip(entry.hf, hf_tensors):
                    writer.add(name, tensor.to(shape.torch_dtype))
        writer.finish(sum(nbytes for _, nbytes in sizes))
        write_json(staging / "config.json", config)
        if assets_from is not None and Path(assets_from).is_dir():
            copy_assets(assets_from, staging)
        if export_dmc:
            copy_modeling_files(staging)
    return Path(out_dir)
