"""Decode attention: each query head over its KV head's ragged, paged cache.

Legend: B sequences, H query heads, G KV heads, N query heads per KV head (H / G),
S cache slots, D head dim.

Query heads are grouped contiguously (KV head g serves heads g*N ... (g+1)*N - 1).
Queries arrive already rotated at their own position (channel D-1 zeroed in DMC mode).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_dmc.inference.kv_cache import PagedKVCache


def paged_attention_reference(
    q_BHD: torch.Tensor, cache: PagedKVCache, layer: int, seq_ids_B: torch.Tensor
) -> torch.Tensor:
    """Plain loop over (sequence, KV head): gather that stream's slots, softmax, sum."""
    batch, num_heads, head_dim = q_BHD.shape
    group = num_heads // cache.config.num_kv_heads
    rows_BGS, valid_BGS = cache.slot_rows(layer, seq_ids_B)
    out_BHD = torch.empty_like(q_BHD)
    for b in range(batch):
        for g in range(cache.config.num_kv_heads):
            rows_S = rows_BGS[b, g][valid_BGS[b, g]]
            keys_SD = cache.pool.k_flat[rows_S].to(q_BHD.dtype)
            values_SD = cache.pool.v_flat[rows_S].to(q_BHD.dtype)
            heads = slice(g * group, (g + 1) * group)
            scores_NS = q_BHD[b, heads] @ keys_SD.T / math.sqrt(head_dim)
            out_BHD[b, heads] = torch.softmax(scores_NS, dim=-1) @ values_SD
    return out_BHD


def paged_attention_padded(
    q_BHD: torch.Tensor, cache: PagedKVCache, layer: int, seq_ids_B: torch.Tensor
) -> torch.Tensor:
    """All streams at once: gather to [B, G, S, D] padded to the longest stream, one SDPA."""
    batch, num_heads, head_dim = q_BHD.shape
    num_groups = cache.config.num_kv_heads
    keys_BGSD, values_BGSD, valid_BGS = cache.gather(layer, seq_ids_B)
    q_BGND = q_BHD.view(batch, num_groups, num_heads // num_groups, head_dim)
    out_BGND = F.scaled_dot_product_attention(
        q_BGND,
        keys_BGSD.to(q_BHD.dtype),
        values_BGSD.to(q_BHD.dtype),
        attn_mask=valid_BGS[:, :, None, :],
    )
    return out_BGND.reshape(batch, num_heads, head_dim)
