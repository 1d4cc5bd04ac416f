"""Timing that waits for the device; on a single-threaded CPU run, this process's CPU time.

The CPU machines these benchmarks run on are shared: wall-clock time there measures the
neighbours' load as much as this code. With one torch thread, the process CPU time is the
time the work itself took, so CPU runs report it (labelled) instead of wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock_name(device: str) -> str:
    if device == "cpu" and torch.get_num_threads() == 1:
        return "process CPU time (1 torch thread; the machine is shared)"
    return "wall clock"


def _clock(device: str) -> Callable[[], float]:
    return (
        time.process_time if device == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    )


def timed(fn: Callable[[], object], device: str) -> tuple[object, float]:
    """(fn(), seconds) with the device synchronised before and after."""
    clock = _clock(device)
    synchronize(device)
    start = clock()
    out = fn()
    synchronize(device)
    return out, clock() - start
