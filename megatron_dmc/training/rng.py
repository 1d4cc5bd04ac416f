"""Random state: saved in checkpoints, and re-derived at every step from (seed, iteration).

Re-seeding each step makes the random stream of step i (Gumbel noise, dropout) a function
of the seed and i alone, so a resumed run draws exactly what the uninterrupted one drew.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

from megatron_dmc.compat import cuda_available

_STEP_STRIDE = 1_000_003
"""A prime: step seeds of different base seeds do not collide for realistic run lengths."""


def step_seed(seed: int, iteration: int) -> int:
    return (seed + _STEP_STRIDE * (iteration + 1)) % (2**31)


def reseed_for_step(seed: int, iteration: int) -> None:
    """Seed torch, NumPy, Python and Megatron's tracker from (seed, iteration)."""
    derived = step_seed(seed, iteration)
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    model_parallel_cuda_manual_seed(derived)


def get_rng_state() -> dict[str, Any]:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if cuda_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if cuda_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
