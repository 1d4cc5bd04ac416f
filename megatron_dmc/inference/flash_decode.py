"""Paged decode attention through flash-attn's `flash_attn_with_kvcache` (GPU, optional).

Legend: B sequences, H query heads, G KV heads, N query heads per KV head, M pages per
stream, D head dim, R streams (B * G).

Every (sequence, KV head) is passed to flash-attn as its own batch row with one KV head
and N query "heads", so each stream keeps its own length (`cache_seqlens`) and block table.
flash-attn 2 requires pages of a multiple of 256 tokens. With a merge delay the kernel
also returns the log-sum-exp of its scores, and the exact ring is merged in as one more
block of the same online softmax (`attention.merge_ring_into_block`, as the blocked and
C++ backends attend it). Not exercised by the CPU tests except through a stand-in kernel.
"""

from __future__ import annotations

import torch
from flash_attn import flash_attn_with_kvcache

from megatron_dmc.inference.attention import RingBlock, merge_ring_into_block
from megatron_dmc.inference.decode import register_backend
from megatron_dmc.inference.kv_cache import PagedKVCache


def paged_attention_flash(
    q_BHD: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    seq_ids_B: torch.Tensor,
    ring: RingBlock | None = None,
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
    out_R1ND, lse_RN1 = flash_attn_with_kvcache(
        q_R1ND,
        k_pages,
        v_pages,
        cache_seqlens=lengths_R,
        block_table=table_RM,
        causal=False,
        return_softmax_lse=True,
    )
    if ring is None:
        return out_R1ND.reshape(batch, num_heads, head_dim)
    out_RND = merge_ring_into_block(
        q_R1ND[:, 0], out_R1ND[:, 0], lse_RN1[..., 0], lengths_R > 0, ring, num_groups
    )
    return out_RND.reshape(batch, num_heads, head_dim)


register_backend("flash", paged_attention_flash)
