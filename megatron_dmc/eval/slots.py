"""KV slots a cache holds, per (layer, sequence, KV head), and the real compression ratio.

A slot is one key/value pair of one KV head. The real CR of a sample is the tokens it
has seen over the slots its last scored token attended to, recent exact tokens included.

Shapes: L layers, B sequences, H KV heads.
"""

from __future__ import annotations

import torch
from transformers import Cache


def slots_held(cache: Cache) -> torch.Tensor:
    """Slots held now, [L, B, H]: a DMC or eviction cache counts them (`slot_counts`), a
    dense cache holds one per token."""
    if hasattr(cache, "slot_counts"):
        return cache.slot_counts()
    return torch.stack(
        [torch.full(layer.keys.shape[:2], layer.keys.shape[-2]) for layer in cache.layers]
    )


def slots_attended(cache: Cache) -> torch.Tensor:
    """Slots the last call's queries saw, [L, B, H]: an eviction cache counts them before
    that call's eviction (`attended_slots`); every other cache holds what it attended."""
    if hasattr(cache, "attended_slots"):
        return cache.attended_slots()
    return slots_held(cache)


def mean_slots(slots_LBH: torch.Tensor) -> float:
    """Mean slots per (layer, sequence, KV head)."""
    return float(slots_LBH.double().mean())
