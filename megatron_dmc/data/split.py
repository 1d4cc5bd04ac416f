"""Deterministic choice of held-out documents (no Megatron import)."""

from __future__ import annotations

import numpy as np


def held_out_indices(num_documents: int, fraction: float, seed: int) -> set[int]:
    """A seeded choice of round(fraction * n) documents (at least 1, and never all)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--split-held-out must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return set()
    if num_documents < 2:
        raise ValueError(f"a held-out split needs at least 2 documents, got {num_documents}")
    count = min(max(1, round(fraction * num_documents)), num_documents - 1)
    order = np.random.default_rng(seed).permutation(num_documents)
    return {int(i) for i in order[:count]}
