"""Paged decode attention as a Triton kernel: one program per (sequence, KV head).

Legend: B sequences, H query heads, G KV heads, N query heads per KV head, M pages per
stream, D head dim, PAGE tokens per page, W merge delay.

The program walks its stream's block table page by page with an online softmax, serving
all N query heads of the group from each loaded page (GQA reads every key once); with a
merge delay the stream's exact ring is one more block of the same softmax (its keys rotated
by `RingBlock.keys_values` before the launch). Runs on GPU, or
on CPU under TRITON_INTERPRET=1 (how the tests check it against the reference).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from megatron_dmc.inference.attention import RingBlock
from megatron_dmc.inference.decode import register_backend
from megatron_dmc.inference.kv_cache import PagedKVCache


@triton.jit
def _online_block(q, k, v, valid, scale, m_i, l_i, acc):
    """One block of keys / values [S, D] (rows where valid) into the running softmax."""
    scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
    scores = tl.where(valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp(m_i - m_safe)
    probs = tl.exp(scores - m_safe[:, None])
    l_i = l_i * rescale + tl.sum(probs, axis=1)
    acc = acc * rescale[:, None] + tl.sum(probs[:, :, None] * v[None, :, :], axis=1)
    return m_new, l_i, acc


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lengths_ptr, ring_k_ptr, ring_v_ptr, ring_lengths_ptr,
    out_ptr, scale, num_pages_per_stream,
    G: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
    D: tl.constexpr, D_P2: tl.constexpr, PAGE: tl.constexpr, W: tl.constexpr,
    W_P2: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    g = tl.program_id(1)
    stream = b * G + g
    length = tl.load(lengths_ptr + stream)
    n_idx = tl.arange(0, GROUP_P2)
    d_idx = tl.arange(0, D_P2)
    s_idx = tl.arange(0, PAGE)
    q_mask = (n_idx[:, None] < GROUP) & (d_idx[None, :] < D)
    q_offsets = (stream * GROUP + n_idx[:, None]) * D + d_idx[None, :]
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0).to(tl.float32)
    m_i = tl.full([GROUP_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P2], tl.float32)
    acc = tl.zeros([GROUP_P2, D_P2], tl.float32)
    for p in range(0, tl.cdiv(length, PAGE)):
        page = tl.load(table_ptr + stream * num_pages_per_stream + p).to(tl.int64)
        valid = p * PAGE + s_idx < length
        kv_offsets = (page * PAGE + s_idx[:, None]) * D + d_idx[None, :]
        kv_mask = valid[:, None] & (d_idx[None, :] < D)
        k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        m_i, l_i, acc = _online_block(q, k, v, valid, scale, m_i, l_i, acc)
    if W > 0:
        w_idx = tl.arange(0, W_P2)
        ring_valid = w_idx < tl.load(ring_lengths_ptr + stream)
        ring_offsets = (stream.to(tl.int64) * W + w_idx[:, None]) * D + d_idx[None, :]
        ring_mask = ring_valid[:, None] & (d_idx[None, :] < D)
        k = tl.load(ring_k_ptr + ring_offsets, mask=ring_mask, other=0.0).to(tl.float32)
        v = tl.load(ring_v_ptr + ring_offsets, mask=ring_mask, other=0.0).to(tl.float32)
        m_i, l_i, acc = _online_block(q, k, v, ring_valid, scale, m_i, l_i, acc)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_offsets, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_attention_triton(
    q_BHD: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    seq_ids_B: torch.Tensor,
    ring: RingBlock | None = None,
) -> torch.Tensor:
    """Same contract as paged_attention_reference; page_size must be a power of two."""
    page = cache.config.page_size
    if page & (page - 1):
        raise ValueError(f"the Triton decode kernel needs a power-of-two page_size; got {page}")
    batch, num_heads, head_dim = q_BHD.shape
    num_groups = cache.config.num_kv_heads
    group = num_heads // num_groups
    q_BHD = q_BHD.contiguous()
    table_BGM = cache.block_table_LBGM[layer, seq_ids_B].contiguous()
    lengths_BG = cache.lengths_LBG[layer, seq_ids_B].contiguous()
    if ring is None:
        ring_k_BGWD = ring_v_BGWD = cache.pool.k_pages_PND[:0]
        ring_lengths_B, window = lengths_BG[:, 0], 0
    else:
        dtype = cache.pool.k_pages_PND.dtype
        ring_k_BGWD, ring_v_BGWD = (x.to(dtype).contiguous() for x in ring.keys_values())
        ring_lengths_B, window = ring.lengths_B, ring_k_BGWD.shape[2]
    ring_lengths_BG = ring_lengths_B[:, None].expand(batch, num_groups).contiguous()
    out_BHD = torch.empty_like(q_BHD)
    _paged_decode_kernel[(batch, num_groups)](
        q_BHD, cache.pool.k_pages_PND, cache.pool.v_pages_PND, table_BGM, lengths_BG,
        ring_k_BGWD, ring_v_BGWD, ring_lengths_BG, out_BHD,
        1.0 / math.sqrt(head_dim), table_BGM.shape[-1],
        G=num_groups, GROUP=group, GROUP_P2=triton.next_power_of_2(group),
        D=head_dim, D_P2=triton.next_power_of_2(head_dim), PAGE=page, W=window,
        W_P2=triton.next_power_of_2(max(window, 1)),
    )  # fmt: skip
    return out_BHD


register_backend("triton", paged_attention_triton)
