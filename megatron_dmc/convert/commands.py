"""The conversions end to end: import-hf, export-hf, roundtrip, reshard, import-release."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from megatron_dmc.convert._model import build_gpt_model
from megatron_dmc.convert.dmc_export import dmc_fields_from_hf
from megatron_dmc.convert.hf_export import DEFAULT_MAX_SHARD_BYTES, write_hf_model
from megatron_dmc.convert.hf_io import HFCheckpoint
from megatron_dmc.convert.megatron_io import (
    MegatronCheckpoint,
    load_into_model,
    save_model,
)
from megatron_dmc.convert.release import ReleaseCheckpoint
from megatron_dmc.convert.writer import check_parallel_sizes, run_on_ranks, write_megatron
from megatron_dmc.finite import check_finite_weights
from megatron_dmc.schema.checkpoint import (
    ASSETS_DIR,
    check_new_directory,
    checkpoint_metadata,
    read_metadata,
    staging_path,
)
from megatron_dmc.schema.llama import LlamaShape, llama_shape_from_hf, read_hf_config
from megatron_dmc.training.damage import checked_iteration_dir


def import_hf(
    hf_dir: str | Path,
    save_dir: str | Path,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
) -> Path:
    """HF Llama directory -> Megatron torch_dist checkpoint at TP x PP (spawns TP*PP ranks)."""
    source = HFCheckpoint(hf_dir)
    metadata = checkpoint_metadata(
        source.shape, dmc=dmc_fields_from_hf(source.config), hf_config=source.config
    )
    return write_megatron(
        HFCheckpoint,
        (str(hf_dir),),
        source.shape,
        save_dir,
        metadata,
        tensor_parallel,
        pipeline_parallel,
        assets_from=str(hf_dir),
    )


def reshard(
    load_dir: str | Path,
    save_dir: str | Path,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
) -> Path:
    """Megatron checkpoint -> the same model saved from a TP x PP world (Megatron's loader)."""
    checked_iteration_dir(load_dir)
    metadata = read_metadata(load_dir)
    shape = LlamaShape.from_dict(metadata["llama"])
    check_parallel_sizes(shape, tensor_parallel, pipeline_parallel)
    final = check_new_directory(save_dir)
    args = (str(load_dir), str(final), metadata)
    try:
        run_on_ranks(_reshard_worker, tensor_parallel, pipeline_parallel, args)
    except BaseException:
        shutil.rmtree(staging_path(final), ignore_errors=True)
        raise
    return final


def _reshard_worker(load_dir: str, save_dir: str, metadata: dict[str, Any]) -> None:
    model = build_gpt_model(LlamaShape.from_dict(metadata["llama"]))
    load_into_model(model, load_dir)
    save_model(model, save_dir, metadata, assets_from=Path(load_dir) / ASSETS_DIR)


def export_hf(
    load_dir: str | Path,
    hf_dir: str | Path,
    dmc: bool | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    assets_from: str | Path | None = None,
    hf_config: str | Path | None = None,
) -> Path:
    """Megatron checkpoint (any TP/PP) -> HF directory, in one process, layer by layer.

    `dmc=None` exports a DMC model iff the checkpoint metadata says it is one.
    `hf_config` (a config.json) describes checkpoints without metadata, e.g. from a
    training run that did not store it; a llama_dmc config also gives the DMC fields.
    """
    check_new_directory(hf_dir)
    checked_iteration_dir(load_dir)
    config = json.loads(Path(hf_config).read_text()) if hf_config else None
    shape = llama_shape_from_hf(config) if config else None
    with MegatronCheckpoint(load_dir, shape) as ckpt:
        dmc_meta = dmc_fields_from_hf(config) if config else ckpt.metadata.get("dmc")
        return write_hf_model(
            FiniteSource(ckpt, load_dir),
            hf_dir,
            base_config=config or ckpt.metadata.get("hf_config"),
            dmc=dmc_meta,
            export_dmc=dmc_meta is not None if dmc is None else dmc,
            assets_from=assets_from or Path(load_dir) / ASSETS_DIR,
            max_shard_bytes=max_shard_bytes,
        )


class FiniteSource:
    """A TensorSource that refuses NaN/inf weights as they are read (nothing is written:
    the export directory appears only when every tensor was finite)."""

    def __init__(self, source: Any, where: str | Path) -> None:
        self.source, self.where, self.shape = source, where, source.shape

    def read(self, group: Any) -> dict[str, torch.Tensor]:
        tensors = self.source.read(group)
        check_finite_weights(tensors.items(), self.where)
        return tensors


def roundtrip(
    hf_dir: str | Path,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    work_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """HF -> Megatron (TP x PP) -> HF; every tensor must come back bitwise identical.

    Returns the compared tensor names; raises ValueError naming the first mismatch.
    """
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        megatron_dir = import_hf(hf_dir, Path(tmp) / "megatron", tensor_parallel, pipeline_parallel)
        back = export_hf(megatron_dir, Path(tmp) / "hf", max_shard_bytes=max_shard_bytes)
        return compare_hf_dirs(hf_dir, back)


def compare_hf_dirs(expected_dir: str | Path, actual_dir: str | Path) -> list[str]:
    """Bitwise comparison of two HF directories' tensors (names, dtypes, values)."""
    expected, actual = HFCheckpoint(expected_dir), HFCheckpoint(actual_dir)
    if set(expected.files) != set(actual.files):
        raise ValueError(f"tensor names differ: {sorted(set(expected.files) ^ set(actual.files))}")
    for name in sorted(expected.files):
        a, b = expected.tensor(name), actual.tensor(name)
        if a.dtype != b.dtype or not torch.equal(a, b):
            raise ValueError(f"tensor {name} differs after the round trip")
    return sorted(expected.files)


def import_release(
    load_dir: str | Path,
    save_dir: str | Path,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    vocab_size: int | None = None,
    trust_pickle: bool = False,
    assets_from: str | Path | None = None,
) -> Path:
    """Megatron-LM torch-format checkpoint (NVIDIA DMC release) -> our torch_dist format."""
    source = ReleaseCheckpoint(load_dir, vocab_size, trust_pickle)
    metadata = checkpoint_metadata(source.shape, dmc=source.dmc)
    return write_megatron(
        ReleaseCheckpoint,
        (str(load_dir), vocab_size, trust_pickle),
        source.shape,
        save_dir,
        metadata,
        tensor_parallel,
        pipeline_parallel,
        assets_from=None if assets_from is None else str(assets_from),
    )


def export_release_hf(
    load_dir: str | Path,
    hf_dir: str | Path,
    vocab_size: int | None = None,
    trust_pickle: bool = False,
    assets_from: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Megatron-LM torch-format checkpoint -> HF directory (DMC config when the run was DMC).

    `assets_from` (the original HF model directory) supplies tokenizer files and, if it
    has one, the config.json whose token ids and extra fields are carried over.
    """
    check_new_directory(hf_dir)
    source = ReleaseCheckpoint(load_dir, vocab_size, trust_pickle)
    has_config = assets_from is not None and (Path(assets_from) / "config.json").is_file()
    return write_hf_model(
        source,
        hf_dir,
        base_config=read_hf_config(assets_from) if has_config else None,
        dmc=source.dmc,
        export_dmc=source.dmc is not None,
        assets_from=assets_from,
        max_shard_bytes=max_shard_bytes,
    )
