"""Decode attention backends: the registry of functions that attend one query per sequence
to its streams' cached slots (and, with a merge delay, the exact ring).

Legend: B sequences, H query heads, D head dim.

A decode step's layer (decisions, cache write, then one of these) is `delay.DecodeStep`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from megatron_dmc.inference.attention import (
    paged_attention_blocked,
    paged_attention_padded,
    paged_attention_reference,
)

PagedAttention = Callable[..., torch.Tensor]
"""(q_rot [B, H, D], cache, layer, seq_ids [B], ring: RingBlock | None = None) -> [B, H, D]."""

BACKENDS: dict[str, PagedAttention] = {
    "reference": paged_attention_reference,
    "padded": paged_attention_padded,
    "blocked": paged_attention_blocked,
}


WITHOUT_RING: set[str] = set()
"""Backends that read only the paged slots (a delayed cache's decode uses `padded` there)."""


def register_backend(name: str, fn: PagedAttention, reads_ring: bool = True) -> None:
    BACKENDS[name] = fn
    if not reads_ring:
        WITHOUT_RING.add(name)


_OPTIONAL_BACKENDS = {
    "triton": "megatron_dmc.inference.triton_decode",
    "flash": "megatron_dmc.inference.flash_decode",
    "paged": "megatron_dmc.inference.paged_cpu",
}


def get_backend(name: str) -> PagedAttention:
    """A decode attention by name; paged, triton and flash are imported on first use."""
    if name not in BACKENDS and name in _OPTIONAL_BACKENDS:
        importlib.import_module(_OPTIONAL_BACKENDS[name])
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]
