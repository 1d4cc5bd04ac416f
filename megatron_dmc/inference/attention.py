"""Decode attention: each query head over its KV head's ragged, paged cache.

Legend: B sequences, H query heads, G KV heads, N query heads per KV head (H / G),
S cache slots, D head dim, R streams (B * G), M pages per stream, C pages per block.

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


def paged_attention_blocked(
    q_BHD: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    seq_ids_B: torch.Tensor,
    block_pages: int = 16,
) -> torch.Tensor:
    """Page-blocked online softmax over the block table, every stream at once.

    Walks `block_pages` pages of every stream per iteration (batched matmuls over the
    streams), so the working set is one block, not a dense copy of the cache.
    """
    batch, num_heads, head_dim = q_BHD.shape
    num_groups, page = cache.config.num_kv_heads, cache.config.page_size
    streams, group = batch * num_groups, num_heads // num_groups
    table_RM = cache.block_table_LBGM[layer, seq_ids_B].flatten(0, 1)
    lengths_R = cache.lengths_LBG[layer, seq_ids_B].flatten()
    q_RND = q_BHD.reshape(streams, group, head_dim) / math.sqrt(head_dim)
    max_RN = torch.full((streams, group), -math.inf, dtype=q_BHD.dtype, device=q_BHD.device)
    sum_RN = torch.zeros_like(max_RN)
    acc_RND = torch.zeros_like(q_RND)
    slots_S = torch.arange(block_pages * page, device=q_BHD.device)
    for start in range(0, -(-int(lengths_R.max()) // page), block_pages):
        pages_RC = table_RM[:, start : start + block_pages].clamp_min(0)
        width = pages_RC.shape[1] * page
        keys_RSD = cache.pool.k_pages_PND.index_select(0, pages_RC.flatten())
        values_RSD = cache.pool.v_pages_PND.index_select(0, pages_RC.flatten())
        keys_RSD = keys_RSD.view(streams, width, head_dim).to(q_BHD.dtype)
        values_RSD = values_RSD.view(streams, width, head_dim).to(q_BHD.dtype)
        valid_RS = start * page + slots_S[:width] < lengths_R[:, None]
        scores_RNS = (q_RND @ keys_RSD.transpose(1, 2)).masked_fill_(~valid_RS[:, None], -math.inf)
        new_max_RN = torch.maximum(max_RN, scores_RNS.amax(-1))
        shift_RN = torch.where(new_max_RN.isinf(), 0.0, new_max_RN)
        rescale_RN = (max_RN - shift_RN).exp_()
        probs_RNS = (scores_RNS - shift_RN[..., None]).exp_()
        sum_RN = sum_RN * rescale_RN + probs_RNS.sum(-1)
        acc_RND = torch.baddbmm(acc_RND * rescale_RN[..., None], probs_RNS, values_RSD)
        max_RN = new_max_RN
    out_RND = acc_RND / sum_RN.clamp_min(torch.finfo(sum_RN.dtype).tiny)[..., None]
    return out_RND.view(batch, num_heads, head_dim)
