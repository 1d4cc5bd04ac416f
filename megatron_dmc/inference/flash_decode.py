"""Paged decode attention through flash-attn's `flash_attn_with_kvcache` (GPU, optional).

Legend: B sequences, H query heads, G KV heads, N query heads per KV head, M pages per
stream, D head dim.

Every (sequence, KV head) is passed to flash-attn as its own batch row with one KV head
and N query "heads", so each stream keeps its own length (`cache_seqlens`) and block table.
flash-attn 2 requires pages of a multiple of 256 tokens. Not exercised by the CPU tests.
It reads no exact ring: a delayed cache decodes through `padded` when it is chosen.
"""

from __future__ import annotations

import torch
from flash_attn import flash_attn_with_kvcache

from megatron_dmc.inference.decode import register_backend
from megatron_dmc.inference.kv_cache import PagedKVCache


def paged_attention_flash(
    q_BHD: torch.Tensor, cache: PagedKVCache, layer: int, seq_ids_B: torch.Tensor
) -> torch.Tensor:
    batch, num_heads, head_dim = q_BHD.shape
    num_groups, page = cache.config.num_kv_heads, cache.config.page_size
    if page % 256:
        raise ValueError(f"flash-attn paged KV needs page_size % 256 == 0; got {page}")
    q_R1ND = q_BHD.reshape(batch * num_groups, 1, num_heads // num_groups, head_dim)
    table_RM = cache.block_table_LBGM[layer, seq_ids_B].flatten(0, 1).clamp_min(0).int()
    lengths_R = cache.lengths_LBG[layer, seq_ids_B].flatten().int()
    k_pages = cache.pool.k_pages_PND[:, :, None]
    v_pages = cache.pool.v_pages_PND[:, :, None]
    out_R1ND = flash_attn_with_kvcache(
        q_R1ND, k_pages, v_pages, cache_seqlens=lengths_R, block_table=table_RM, causal=False
    )
    return out_R1ND.reshape(batch, num_heads, head_dim)


register_backend("flash", paged_attention_flash, reads_ring=False)
