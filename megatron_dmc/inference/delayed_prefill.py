"""A continuation chunk with a merge delay W, in parallel: outputs and the cache update.

Legend: B sequences, H query heads, G KV heads, T chunk time, n exact ring entries before
the chunk (min(start, W)), X = n + T recent tokens, M tokens leaving the ring during the
chunk, S paged slots, K keys of the attention (S + M + X), Q = N * T queries of one KV
head (N query heads per KV head), D head dim.

The recent tokens are the old ring entries followed by the chunk. While query i (at
position start + i) is processed, the token at position start + i - W leaves the ring:
recent index a_i = i + n - W. So the leaving tokens are the first M = max(X - W, 0)
recent tokens; they continue the compressed cache exactly like a non-delayed continuation
chunk (`prefill.accumulate_after_context`). Query i sees the paged slots (the cached open
slot hidden once a leaving token merged into it), the partial accumulations of the
leaving tokens up to a_i (each hidden once its successor merged into it, applied), and
the exact recent tokens a_i < x <= n + i, rotated at their own positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from megatron_dmc.inference.decisions import ForcedRate, layer_decisions
from megatron_dmc.inference.kv_cache import ChunkKV, PagedKVCache
from megatron_dmc.inference.prefill import accumulate_after_context
from megatron_dmc.ops import (
    DecisionLogits,
    DMCConfig,
    key_for_accumulation,
    rope_for_attention,
    rope_for_query,
)

RopeTables = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def delayed_chunk_attention(
    q_BHTD: torch.Tensor,
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    start: int,
    cos_TD: torch.Tensor,
    sin_TD: torch.Tensor,
    rope: RopeTables,
    cache: PagedKVCache,
    layer: int,
    seq_ids_B: torch.Tensor,
    dmc: DMCConfig,
    forced: ForcedRate | None = None,
    logits: DecisionLogits | None = None,
) -> torch.Tensor:
    """Raw pre-RoPE q, k, v of T new tokens of sequences that have all seen `start` > 0
    tokens (no padding) -> attention output [B, H, T, D]; the cache then holds them."""
    cache.check_compatible(dmc)
    if not bool((cache.seen_LB[layer, seq_ids_B] == start).all()):
        raise ValueError("a delayed continuation chunk needs every sequence at one position")
    batch, length = k_BGTD.shape[0], k_BGTD.shape[2]
    positions_BT = torch.arange(start, start + length, device=k_BGTD.device).expand(batch, -1)
    alpha_BGT, omega_BGT = layer_decisions(q_BHTD, k_BGTD, positions_BT, dmc, forced, logits)
    k_in_BGTD = key_for_accumulation(k_BGTD, dmc)
    full_B = torch.full_like(seq_ids_B, length)
    chunk = ChunkKV(k_in_BGTD, v_BGTD, k_in_BGTD, v_BGTD, alpha_BGT, omega_BGT, full_B)
    q_rot_BHTD = rope_for_query(q_BHTD, cos_TD, sin_TD, dmc, k_BGTD.shape[1])
    return delayed_continuation(q_rot_BHTD, chunk, start, rope, cache, layer, seq_ids_B, dmc)


def delayed_continuation(
    q_rot_BHTD: torch.Tensor,
    chunk: ChunkKV,
    start: int,
    rope: RopeTables,
    cache: PagedKVCache,
    layer: int,
    seq_ids_B: torch.Tensor,
    dmc: DMCConfig,
) -> torch.Tensor:
    """Attention output [B, H, T, D] of a chunk continuing sequences all at `start`;
    writes the leaving tokens to the paged slots and refills the exact ring."""
    delay, length = dmc.merge_delay, chunk.k_BGTD.shape[2]
    n = min(start, delay)
    seen_B = torch.full_like(seq_ids_B, start)
    ring = cache.exact.chronological(layer, seq_ids_B, seen_B)
    dtype = chunk.k_BGTD.dtype
    k_BGXD, v_BGXD = (
        torch.cat([r[:, :, delay - n :].to(dtype), c], 2)
        for r, c in ((ring[0], chunk.k_BGTD), (ring[1], chunk.v_BGTD))
    )
    alpha_BGX = torch.cat([ring[2][:, :, delay - n :], chunk.alpha_BGT.bool()], 2)
    omega_BGX = torch.cat([ring[3][:, :, delay - n :].to(dtype), chunk.omega_BGT], 2)
    cos_XD, sin_XD = rope(torch.arange(start - n, start + length, device=k_BGXD.device))
    m = max(n + length - delay, 0)
    ktilde_BGMD, vtilde_BGMD = _leaving_accumulations(
        k_BGXD[:, :, :m],
        v_BGXD[:, :, :m],
        alpha_BGX[:, :, :m],
        omega_BGX[:, :, :m],
        cache,
        layer,
        seq_ids_B,
        dmc.window_size,
    )
    keys_BGMD = rope_for_attention(ktilde_BGMD, cos_XD[:m], sin_XD[:m], dmc)
    exact_BGXD = rope_for_attention(k_BGXD, cos_XD, sin_XD, dmc)
    visible_BGTK = _visibility(cache, layer, seq_ids_B, alpha_BGX[:, :, :m], n, length, delay)
    out_BHTD = _attend(
        q_rot_BHTD,
        cache,
        layer,
        seq_ids_B,
        torch.cat([keys_BGMD, exact_BGXD], 2),
        torch.cat([vtilde_BGMD, v_BGXD], 2),
        visible_BGTK,
    )
    leaving = ChunkKV(
        keys_BGMD,
        vtilde_BGMD,
        k_BGXD[:, :, :m],
        v_BGXD[:, :, :m],
        alpha_BGX[:, :, :m],
        omega_BGX[:, :, :m],
        torch.full_like(seq_ids_B, m),
    )
    recent = ChunkKV(
        exact_BGXD,
        v_BGXD,
        k_BGXD,
        v_BGXD,
        alpha_BGX,
        omega_BGX,
        torch.full_like(seq_ids_B, n + length),
    )
    cache.write_delayed(layer, seq_ids_B, leaving, recent, seen_B - n)
    return out_BHTD


def _leaving_accumulations(k_BGMD, v_BGMD, alpha_BGM, omega_BGM, cache, layer, seq_ids_B, window):
    if k_BGMD.shape[2] == 0:
        return k_BGMD, v_BGMD
    return accumulate_after_context(
        k_BGMD, v_BGMD, alpha_BGM, omega_BGM, cache, layer, seq_ids_B, window
    )


def _visibility(cache, layer, seq_ids_B, alpha_BGM, n, length, delay) -> torch.Tensor:
    """[B, G, T, S + M + X] keys visible to each query."""
    lengths_BG = cache.lengths_LBG[layer, seq_ids_B]
    m, device = alpha_BGM.shape[-1], alpha_BGM.device
    longest = max(int(lengths_BG.max()) if lengths_BG.numel() else 0, 1)
    s_S = torch.arange(longest, device=device)
    valid_BGS = s_S < lengths_BG[..., None]
    applied_T = torch.arange(length, device=device) + n - delay
    first_merges_BG = alpha_BGM[..., 0] if m else torch.zeros_like(valid_BGS[..., 0])
    hide_BGT = first_merges_BG[..., None] & (applied_T >= 0)
    open_BGS = s_S == lengths_BG[..., None] - 1
    paged_BGTS = valid_BGS[:, :, None] & ~(open_BGS[:, :, None] & hide_BGT[..., None])
    j_M = torch.arange(m, device=device)
    next_merges_BGM = torch.cat([alpha_BGM[..., 1:], torch.zeros_like(alpha_BGM[..., :1])], -1)
    below_TM = j_M < applied_T[:, None]
    accum_BGTM = (below_TM & ~next_merges_BGM[:, :, None]) | (j_M == applied_T[:, None])
    x_X = torch.arange(n + length, device=device)
    exact_TX = (x_X > applied_T[:, None]) & (x_X <= applied_T[:, None] + delay)
    b, g = lengths_BG.shape
    exact_BGTX = exact_TX.expand(b, g, -1, -1)
    return torch.cat([paged_BGTS, accum_BGTM, exact_BGTX], dim=-1)


def _attend(q_rot_BHTD, cache, layer, seq_ids_B, keys_BGYD, values_BGYD, visible_BGTK):
    batch, num_heads, length, head_dim = q_rot_BHTD.shape
    groups = keys_BGYD.shape[1]
    keys_BGSD, values_BGSD, _ = cache.gather(layer, seq_ids_B)
    dtype = q_rot_BHTD.dtype
    keys_BGKD = torch.cat([keys_BGSD.to(dtype), keys_BGYD], dim=2)
    values_BGKD = torch.cat([values_BGSD.to(dtype), values_BGYD], dim=2)
    q_BGQD = q_rot_BHTD.reshape(batch, groups, num_heads // groups * length, head_dim)
    group = num_heads // groups
    visible_BGQK = visible_BGTK[:, :, None].expand(-1, -1, group, -1, -1).flatten(2, 3)
    out_BGQD = F.scaled_dot_product_attention(
        q_BGQD, keys_BGKD, values_BGKD, attn_mask=visible_BGQK
    )
    return out_BGQD.view(batch, num_heads, length, head_dim)
