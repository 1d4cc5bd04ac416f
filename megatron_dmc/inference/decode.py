"""One decode step of one attention layer: Algorithm 1 on the cache, then paged attention.

Legend: B sequences, H query heads, G KV heads, D head dim.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch.profiler import record_function

from megatron_dmc.inference.attention import (
    paged_attention_blocked,
    paged_attention_padded,
    paged_attention_reference,
)
from megatron_dmc.inference.decisions import ForcedRate, layer_decisions
from megatron_dmc.inference.kv_cache import PagedKVCache
from megatron_dmc.ops import DMCConfig, apply_rope, rope_without_decision_channel

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


def decode_attention(
    q_BHD: torch.Tensor,
    k_BGD: torch.Tensor,
    v_BGD: torch.Tensor,
    positions_B: torch.Tensor,
    cos_BD: torch.Tensor,
    sin_BD: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    seq_ids_B: torch.Tensor,
    dmc: DMCConfig | None,
    forced: ForcedRate | None = None,
    backend: str = "padded",
) -> torch.Tensor:
    """Raw pre-RoPE q, k, v of one new token per sequence -> attention output [B, H, D]."""
    cache.check_compatible(dmc)
    with record_function("decode.decisions"):
        if dmc is None:
            alpha_BG = torch.zeros(k_BGD.shape[:2], dtype=torch.bool, device=k_BGD.device)
            omega_BG = torch.ones(k_BGD.shape[:2], dtype=k_BGD.dtype, device=k_BGD.device)
            q_rot_BHD = apply_rope(q_BHD, cos_BD[:, None], sin_BD[:, None])
        else:
            alpha_BGT, omega_BGT = layer_decisions(
                q_BHD[:, :, None], k_BGD[:, :, None], positions_B[:, None], dmc, forced
            )
            alpha_BG, omega_BG = alpha_BGT[..., 0], omega_BGT[..., 0]
            q_rot_BHD = rope_without_decision_channel(q_BHD, cos_BD[:, None], sin_BD[:, None])
    with record_function("decode.cache_write"):
        cache.append(layer, seq_ids_B, k_BGD, v_BGD, alpha_BG, omega_BG, cos_BD, sin_BD)
    with record_function("decode.attention"):
        return get_backend(backend)(q_rot_BHD, cache, layer, seq_ids_B)
