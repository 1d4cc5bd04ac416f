"""Process groups and seeds for Megatron-Core, under torchrun or inside one test process.

`initialize_distributed` joins (or creates) the default process group -- NCCL with
CUDA, gloo on CPU -- then Megatron-Core's tensor/pipeline/data-parallel groups, and
seeds every generator. Without torchrun's environment it starts a world of one on
127.0.0.1, so single-process scripts and tests need no launcher.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_dmc.compat import cuda_available, ensure_cpu_compat


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RANK_PRELOAD = ("megatron_dmc.distributed", "megatron_dmc.training.loop")
"""Modules the fork server of `local_rank_context` imports once for every rank it starts."""


def local_rank_context(
    extra_preload: tuple[str, ...] = (),
) -> multiprocessing.context.BaseContext:
    """The multiprocessing context for ranks started on this machine: a fork server that
    has imported Megatron-Core and this package (RANK_PRELOAD plus the caller's
    `extra_preload`) once, so a rank starts in a fraction of a second instead of importing
    them again (~7 CPU-seconds each). The first call of a process starts the server, so its
    preload list is the one that counts. A rank inherits the environment of the moment the
    server started; `set_local_rank_env` sets its own."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*RANK_PRELOAD, *extra_preload])
    return context


def set_local_rank_env(rank: int, world_size: int, port: int) -> None:
    """The env:// variables torchrun would set, for a process spawned on 127.0.0.1."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )


def _check_sizes(tensor_model_parallel_size: int, pipeline_model_parallel_size: int) -> None:
    for name, size in (
        ("tensor_model_parallel_size", tensor_model_parallel_size),
        ("pipeline_model_parallel_size", pipeline_model_parallel_size),
    ):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {size!r}")


def _init_process_group(timeout_minutes: int) -> None:
    """env:// under torchrun or a spawned rank; otherwise a world of one on an in-memory
    store (no TCP port to race for, no environment left behind)."""
    if dist.is_initialized():
        return
    backend = "nccl" if cuda_available() else "gloo"
    if cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ:
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch generators plus Megatron's model-parallel RNG tracker.

    The default torch generator gets the same seed on every rank, so weights built with
    `use_cpu_initialization=True` are identical whatever the tensor-parallel size.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 10,
) -> None:
    """Default process group + Megatron-Core model-parallel groups + seeds.

    The world size must be a multiple of tensor x pipeline size; what is left over
    is data parallel.
    """
    _check_sizes(tensor_model_parallel_size, pipeline_model_parallel_size)
    ensure_cpu_compat()
    _init_process_group(timeout_minutes)
    world = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world % model_parallel != 0:
        raise ValueError(
            f"world size {world} is not divisible by tensor x pipeline parallel size "
            f"({tensor_model_parallel_size} x {pipeline_model_parallel_size}); launch a "
            "multiple of that many processes"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)


def destroy_distributed() -> None:
    """Tear down Megatron-Core's groups and the default process group (idempotent)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
