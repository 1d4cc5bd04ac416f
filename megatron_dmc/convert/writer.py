"""Write any TensorSource as a Megatron torch_dist checkpoint from TP x PP ranks."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_dmc.convert._model import build_gpt_model
from megatron_dmc.convert.megatron_io import TensorSource, save_from_source
from megatron_dmc.convert.parallel import run_parallel
from megatron_dmc.distributed import destroy_distributed, initialize_distributed
from megatron_dmc.schema.checkpoint import check_new_directory, staging_path
from megatron_dmc.schema.llama import LlamaShape


def check_parallel_sizes(shape: LlamaShape, tensor_parallel: int, pipeline_parallel: int) -> None:
    """Refuse TP/PP sizes the model cannot be split into (before anything is written)."""
    shape.check_parallel(tensor_parallel, pipeline_parallel)


def write_megatron(
    source_factory: Any,
    factory_args: tuple[Any, ...],
    shape: LlamaShape,
    save_dir: str | Path,
    metadata: dict[str, Any],
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    assets_from: str | Path | None = None,
) -> Path:
    """Write a source (rebuilt in each rank by `source_factory(*factory_args)`) at TP x PP."""
    check_parallel_sizes(shape, tensor_parallel, pipeline_parallel)
    final = check_new_directory(save_dir)
    args = (source_factory, factory_args, str(final), metadata, assets_from)
    try:
        run_on_ranks(_write_worker, tensor_parallel, pipeline_parallel, args)
    except BaseException:
        shutil.rmtree(staging_path(final), ignore_errors=True)
        raise
    return final


def run_on_ranks(
    fn: Any, tensor_parallel: int, pipeline_parallel: int, args: tuple[Any, ...]
) -> list[Any]:
    """`fn(*args)` on TP x PP ranks; a world of one runs in this process (no spawn)."""
    if tensor_parallel * pipeline_parallel > 1 or dist.is_initialized():
        return run_parallel(fn, tensor_parallel, pipeline_parallel, args)
    initialize_distributed(1, 1)
    try:
        return [fn(*args)]
    finally:
        destroy_distributed()


def _write_worker(
    source_factory: Any,
    factory_args: tuple[Any, ...],
    save_dir: str,
    metadata: dict[str, Any],
    assets_from: str | None,
) -> None:
    source: TensorSource = source_factory(*factory_args)
    model = build_gpt_model(source.shape)
    save_from_source(model, source, save_dir, metadata, assets_from=assets_from)
