"""Run megatron-core 0.16.1 on CPU with gloo: runtime patches, applied only without CUDA.

Megatron-Core assumes a GPU in a few places. Each patch below replaces one of those
assumptions at run time (nothing on disk is changed) and does nothing when CUDA is
available:

1. `torch.cuda.current_device()` returns the CPU device. Megatron uses it as the device
   of new tensors: RoPE `inv_freq`, attention and KV-cache buffers, pipeline receive
   buffers, DDP grad buffers, checkpoint saving.
2. `torch.cuda.synchronize()` is a no-op (checkpoint save, pipeline sends).
3. The model-parallel RNG tracker forks the CPU generator instead of a CUDA one, and
   activation recompute saves and restores the CPU generator where it would touch the
   "CUDA" RNG state (`tensor_parallel.random._get/_set_cuda_rng_state`).
4. The default causal (and sliding-window) softmax masks, used when no attention mask
   is passed, are built on the CPU instead of with a hard-coded `device="cuda"`.
5. `cpu_device_mode()`: a context manager that rewrites `device="cuda"` (and
   `Tensor.cuda()`, `Tensor.to("cuda")`) to the CPU. Wrap calls into code that
   hard-codes the device: the `get_forward_backward_func()` schedules and the
   Megatron optimizer.

Config side (not patched here; see `megatron_dmc.model.config`): keep the fusions off,
`use_cpu_initialization=True`, `pipeline_dtype=torch.float32`, `batch_p2p_sync=False`,
no sequence parallel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.tensor_parallel.random import CudaRNGStatesTracker as _BaseTracker
from torch.overrides import TorchFunctionMode

_applied = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def ensure_cpu_compat() -> bool:
    """Apply the CPU patches once (idempotent). Returns True when they are active."""
    global _applied
    if cuda_available():
        return False
    if not _applied:
        _patch_current_device()
        _patch_synchronize()
        _patch_rng()
        _patch_default_masks()
        _applied = True
    return True


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _patch_current_device() -> None:
    torch.cuda.current_device = _cpu_device


def _patch_synchronize() -> None:
    def synchronize(device: object = None) -> None:
        return None

    torch.cuda.synchronize = synchronize


def _get_cpu_rng_state(
    device: object = "cuda", clone: bool = False, graph_safe: bool = False
) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: object = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random._get_cuda_rng_state = _get_cpu_rng_state
    mpu_random._set_cuda_rng_state = _set_cpu_rng_state
    mpu_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    tracker = mpu_random._CUDA_RNG_STATE_TRACKER
    if tracker is not None and not isinstance(tracker, CpuRNGStatesTracker):
        mpu_random.initialize_rng_tracker(force_reset=True)


class CpuRNGStatesTracker(_BaseTracker):
    """Megatron's named RNG states, kept as states of the CPU generator.

    `fork(name)` swaps the CPU generator to the named state for the duration of the
    block and stores where it ended, exactly what the CUDA tracker does with the CUDA
    generator (and without its "CPU RNG state changed" warning, which would fire on
    every fork here because the CPU generator is the forked one).
    """

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        outer_name = self._current_state_name
        if outer_name != "default-rng":
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if outer_name != "default-rng":
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name


def _patch_default_masks() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    def causal_mask(sq: int) -> torch.Tensor:
        with _CudaToCpuMode():
            return original_causal(sq)

    def sliding_window_mask(sq: int, skv: int, window_size: object) -> torch.Tensor:
        with _CudaToCpuMode():
            return original_sliding(sq, skv, window_size)

    original_causal = utils.get_default_causal_mask
    original_sliding = utils.get_sliding_window_causal_mask
    for module in (utils, fused_softmax):
        module.get_default_causal_mask = causal_mask
        module.get_sliding_window_causal_mask = sliding_window_mask


def _is_cuda(device: object) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cpu_device_mode() -> Iterator[None]:
    """Rewrite hard-coded CUDA devices to the CPU inside the block (no-op with CUDA)."""
    if cuda_available():
        yield
        return
    with _CudaToCpuMode():
        yield
