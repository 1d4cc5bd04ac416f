"""Decode attention: each query head over its KV head's ragged, paged cache.

Legend: B sequences, H query heads, G KV heads, N query heads per KV head (H / G),
S cache slots, D head dim, R streams (B * G), M pages per stream, C pages per block,
W merge delay (exact ring entries per stream).

Query heads are grouped contiguously (KV head g serves heads g*N ... (g+1)*N - 1).
Queries arrive already rotated at their own position (channel D-1 zeroed in DMC mode).
With a merge delay every backend also takes the exact ring as a `RingBlock`: one more
block per stream, attended in the same softmax as the paged slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_dmc.inference.kv_cache import PagedKVCache
from megatron_dmc.ops import apply_rope


@dataclass
class RingBlock:
    """The exact ring of one layer for a batch: the W newest tokens of every stream, read
    in place from the ring's layer slab (pre-RoPE keys), with the RoPE tables of each ring
    index. Valid entries are a prefix: index w holds a token iff w < lengths_B[b].

    The keys get plain RoPE: in channel mode the stored key's channel D-1 is zero and so is
    the query's, so that equals the cache's rotation in every dot product.
    """

    k_XGWD: torch.Tensor
    """Pre-RoPE keys of every batch row of the cache (X = max_batch rows), this layer."""
    v_XGWD: torch.Tensor
    seq_ids_B: torch.Tensor
    cos_BWD: torch.Tensor
    """RoPE tables at the position each ring index holds (any value where invalid)."""
    sin_BWD: torch.Tensor
    lengths_B: torch.Tensor
    """Valid ring entries per sequence: min(tokens seen, W) (int64)."""

    def valid_BW(self) -> torch.Tensor:
        w_W = torch.arange(self.k_XGWD.shape[2], device=self.lengths_B.device)
        return w_W < self.lengths_B[:, None]

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rotated keys, values) [B, G, W, D]: a copy of the batch's rings (torch backends)."""
        k_BGWD = apply_rope(
            self.k_XGWD[self.seq_ids_B], self.cos_BWD[:, None], self.sin_BWD[:, None]
        )
        return k_BGWD, self.v_XGWD[self.seq_ids_B]


def paged_attention_reference(
    q_BHD: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    seq_ids_B: torch.Tensor,
    ring: RingBlock | None = None,
) -> torch.Tensor:
    """Plain loop over (sequence, KV head): gather that stream's slots (and its ring
    entries), softmax, sum."""
    batch, num_heads, head_dim = q_BHD.shape
    group = num_heads // cache.config.num_kv_heads
    rows_BGS, valid_BGS = cache.slot_rows(layer, seq_ids_B)
    ring_k_BGWD, ring_v_BGWD = ring.keys_values() if ring is not None else (None, None)
    out_BHD = torch.empty_like(q_BHD)
    for b in range(batch):
        for g in range(cache.config.num_kv_heads):
            rows_S = rows_BGS[b, g][valid_BGS[b, g]]
            keys_SD = cache.pool.k_flat[rows_S].to(q_BHD.dtype)
            values_SD = cache.pool.v_flat[rows_S].to(q_BHD.dtype)
            if ring is not None:
                kept = int(ring.lengths_B[b])
                keys_SD = torch.cat([keys_SD, ring_k_BGWD[b, g, :kept].to(q_BHD.dtype)])
                values_SD = torch.cat([values_SD, ring_v_BGWD[b, g, :kept].to(q_BHD.dtype)])
            heads = slice(g * group, (g + 1) * group)
            scores_NS = q_BHD[b, heads] @ keys_SD.T / math.sqrt(head_dim)
            out_BHD[b, heads] = torch.softmax(scores_NS, dim=-1) @ values_SD
    return out_BHD


def paged_attention_padded(
    q_BHD: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    seq_ids_B: torch.Tensor,
    ring: RingBlock | None = None,
) -> torch.Tensor:
    """All streams at once: gather to [B, G, S, D] padded to the longest stream (the ring
    appended), one SDPA. Copies the whole cache every call: the gather reference."""
    batch, num_heads, head_dim = q_BHD.shape
    num_groups = cache.config.num_kv_heads
    keys_BGSD, values_BGSD, valid_BGS = cache.gather(layer, seq_ids_B)
    keys_BGSD, values_BGSD = keys_BGSD.to(q_BHD.dtype), values_BGSD.to(q_BHD.dtype)
    if ring is not None:
        ring_k_BGWD, ring_v_BGWD = ring.keys_values()
        keys_BGSD = torch.cat([keys_BGSD, ring_k_BGWD.to(q_BHD.dtype)], dim=2)
        values_BGSD = torch.cat([values_BGSD, ring_v_BGWD.to(q_BHD.dtype)], dim=2)
        ring_valid_BGW = ring.valid_BW()[:, None].expand(-1, num_groups, -1)
        valid_BGS = torch.cat([valid_BGS, ring_valid_BGW], dim=-1)
    q_BGND = q_BHD.view(batch, num_groups, num_heads // num_groups, head_dim)
    out_BGND = F.scaled_dot_product_attention(
        q_BGND, keys_BGSD, values_BGSD, attn_mask=valid_BGS[:, :, None, :]
    )
    return out_BGND.reshape(batch, num_heads, head_dim)


def paged_attention_blocked(
    q_BHD: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    seq_ids_B: torch.Tensor,
    ring: RingBlock | None = None,
    block_pages: int = 16,
) -> torch.Tensor:
    """Page-blocked online softmax over the block table, every stream at once.

    Walks `block_pages` pages of every stream per iteration (batched matmuls over the
    streams), so the working set is one block, not a dense copy of the cache; the exact
    ring, when given, is one more block.
    """
    batch, num_heads, head_dim = q_BHD.shape
    num_groups, page = cache.config.num_kv_heads, cache.config.page_size
    streams, group = batch * num_groups, num_heads // num_groups
    table_RM = cache.block_table_LBGM[layer, seq_ids_B].flatten(0, 1)
    lengths_R = cache.lengths_LBG[layer, seq_ids_B].flatten()
    q_RND = q_BHD.reshape(streams, group, head_dim) / math.sqrt(head_dim)
    state = _OnlineSoftmax.start(q_RND)
    slots_S = torch.arange(block_pages * page, device=q_BHD.device)
    for start in range(0, -(-int(lengths_R.max()) // page), block_pages):
        pages_RC = table_RM[:, start : start + block_pages].clamp_min(0)
        width = pages_RC.shape[1] * page
        keys_RSD = cache.pool.k_pages_PND.index_select(0, pages_RC.flatten())
        values_RSD = cache.pool.v_pages_PND.index_select(0, pages_RC.flatten())
        valid_RS = start * page + slots_S[:width] < lengths_R[:, None]
        state.add(
            keys_RSD.view(streams, width, head_dim),
            values_RSD.view(streams, width, head_dim),
            valid_RS,
        )
    if ring is not None:
        state.add_ring(ring, num_groups)
    return state.result().view(batch, num_heads, head_dim)


def merge_ring_into_block(
    q_RND: torch.Tensor,
    out_RND: torch.Tensor,
    lse_RN: torch.Tensor,
    nonempty_R: torch.Tensor,
    ring: RingBlock,
    num_groups: int,
) -> torch.Tensor:
    """Attention over the paged slots, given as one finished block (its normalised output
    and the log-sum-exp of its scaled scores, e.g. from a fused kernel), then the exact ring
    as one more block of the same online softmax, as `paged_attention_blocked` does. Streams
    with no paged slot (`nonempty_R` False) take the ring alone, whatever their lse says.
    q is unscaled; everything is computed in fp32. Returns [R, N, D] in q's dtype."""
    scale = 1.0 / math.sqrt(q_RND.shape[-1])
    max_RN = torch.where(nonempty_R[:, None], lse_RN.float(), -math.inf)
    state = _OnlineSoftmax(
        q_RND.float() * scale,
        max_RN,
        nonempty_R[:, None].float().expand_as(max_RN).clone(),
        torch.where(nonempty_R[:, None, None], out_RND.float(), 0.0),
    )
    state.add_ring(ring, num_groups)
    return state.result().to(q_RND.dtype)


@dataclass
class _OnlineSoftmax:
    """Running max, sum and weighted values of every stream's query heads."""

    q_RND: torch.Tensor
    max_RN: torch.Tensor
    sum_RN: torch.Tensor
    acc_RND: torch.Tensor

    @classmethod
    def start(cls, q_RND: torch.Tensor) -> _OnlineSoftmax:
        max_RN = torch.full(q_RND.shape[:2], -math.inf, dtype=q_RND.dtype, device=q_RND.device)
        return cls(q_RND, max_RN, torch.zeros_like(max_RN), torch.zeros_like(q_RND))

    def add(self, keys_RSD, values_RSD, valid_RS) -> None:
        """One block of keys and values per stream (invalid entries masked out)."""
        keys_RSD, values_RSD = keys_RSD.to(self.q_RND.dtype), values_RSD.to(self.q_RND.dtype)
        scores_RNS = self.q_RND @ keys_RSD.transpose(1, 2)
        scores_RNS.masked_fill_(~valid_RS[:, None], -math.inf)
        new_max_RN = torch.maximum(self.max_RN, scores_RNS.amax(-1))
        shift_RN = torch.where(new_max_RN.isinf(), 0.0, new_max_RN)
        rescale_RN = (self.max_RN - shift_RN).exp_()
        probs_RNS = (scores_RNS - shift_RN[..., None]).exp_()
        self.sum_RN = self.sum_RN * rescale_RN + probs_RNS.sum(-1)
        self.acc_RND = torch.baddbmm(self.acc_RND * rescale_RN[..., None], probs_RNS, values_RSD)
        self.max_RN = new_max_RN

    def add_ring(self, ring: RingBlock, num_groups: int) -> None:
        """The exact ring of every stream as one more block."""
        valid_RW = ring.valid_BW().repeat_interleave(num_groups, dim=0)
        ring_k_BGWD, ring_v_BGWD = ring.keys_values()
        self.add(ring_k_BGWD.flatten(0, 1), ring_v_BGWD.flatten(0, 1), valid_RW)

    def result(self) -> torch.Tensor:
        return self.acc_RND / self.sum_RN.clamp_min(torch.finfo(self.sum_RN.dtype).tiny)[..., None]
