"""Compatibility layers between megatron-core and the hardware we run on."""

from megatron_dmc.compat.cpu import (
    CpuRNGStatesTracker,
    cpu_device_mode,
    cuda_available,
    ensure_cpu_compat,
)

__all__ = ["CpuRNGStatesTracker", "cpu_device_mode", "cuda_available", "ensure_cpu_compat"]
