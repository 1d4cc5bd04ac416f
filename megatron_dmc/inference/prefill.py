"""Parallel prefill of one attention layer: outputs for a chunk of tokens, and the cache built
directly from the parallel form (closed slots, open slot, window state) -- not token by token.

Legend: B sequences, H query heads, G KV heads, N query heads per KV head, T chunk time,
Q = N * T queries of one KV head, X = S + T keys of a continuation chunk,
S cached slots, W window, D head dim.

The first chunk of a sequence uses the training-form attention in eval mode
(ops.dmc_attention); a later chunk also attends to the slots cached by earlier chunks,
and its partial accumulations continue the cached open run through the window state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_dmc.inference.decisions import ForcedRate, layer_decisions
from megatron_dmc.inference.kv_cache import ChunkKV, PagedKVCache
from megatron_dmc.ops import (
    DecisionLogits,
    DMCConfig,
    apply_rope,
    attention_bias,
    dmc_attention,
    key_for_accumulation,
    rope_for_attention,
    rope_for_query,
    windowed_partial_accumulation,
)


def prefill_attention(
    q_BHTD: torch.Tensor,
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    positions_BT: torch.Tensor,
    cos_BTD: torch.Tensor,
    sin_BTD: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    seq_ids_B: torch.Tensor,
    lengths_B: torch.Tensor,
    dmc: DMCConfig | None,
    forced: ForcedRate | None = None,
    logits: DecisionLogits | None = None,
) -> torch.Tensor:
    """Attention output [B, H, T, D] of a right-padded chunk; writes the chunk to the cache.

    Raw pre-RoPE q, k, v; tokens at t >= lengths_B[b] are padding (their outputs are
    garbage). dmc None: vanilla Llama attention (plain RoPE, no compression). `logits`:
    the decision heads' (heads mode). With a merge delay only a first chunk is parallel.
    """
    cache.check_compatible(dmc)
    first = int(positions_BT[:, 0].max()) == 0
    if dmc is not None and dmc.merge_delay and not first:
        raise ValueError("with a merge delay, continue a sequence by decode steps")
    cos_B1TD, sin_B1TD = cos_BTD[:, None], sin_BTD[:, None]
    if dmc is None:
        chunk = _vanilla_chunk(k_BGTD, v_BGTD, cos_B1TD, sin_B1TD, lengths_B)
        q_rot_BHTD = apply_rope(q_BHTD, cos_B1TD, sin_B1TD)
        hidden_prefix_BG = torch.zeros_like(chunk.alpha_BGT[..., 0])
    else:
        chunk = _dmc_chunk(
            q_BHTD,
            k_BGTD,
            v_BGTD,
            positions_BT,
            cos_B1TD,
            sin_B1TD,
            lengths_B,
            dmc,
            forced,
            cache,
            layer,
            seq_ids_B,
            first,
            logits,
        )
        q_rot_BHTD = rope_for_query(q_BHTD, cos_B1TD, sin_B1TD, dmc, k_BGTD.shape[1])
        hidden_prefix_BG = chunk.alpha_BGT[..., 0]
    if first and dmc is not None and dmc.merge_delay:
        out_BHTD = _delayed_first_chunk_attention(q_rot_BHTD, chunk, cos_B1TD, sin_B1TD, dmc)
    elif first:
        out_BHTD = _first_chunk_attention(q_rot_BHTD, chunk)
    else:
        out_BHTD = _attention_with_prefix(
            q_rot_BHTD, chunk, hidden_prefix_BG, cache, layer, seq_ids_B
        )
    cache.write_chunk(layer, seq_ids_B, chunk)
    return out_BHTD


def _vanilla_chunk(k_BGTD, v_BGTD, cos_B1TD, sin_B1TD, lengths_B) -> ChunkKV:
    alpha_BGT = torch.zeros(k_BGTD.shape[:3], dtype=torch.bool, device=k_BGTD.device)
    omega_BGT = torch.ones(k_BGTD.shape[:3], dtype=k_BGTD.dtype, device=k_BGTD.device)
    keys_BGTD = apply_rope(k_BGTD, cos_B1TD, sin_B1TD)
    return ChunkKV(keys_BGTD, v_BGTD, k_BGTD, v_BGTD, alpha_BGT, omega_BGT, lengths_B)


def _dmc_chunk(
    q_BHTD,
    k_BGTD,
    v_BGTD,
    positions_BT,
    cos_B1TD,
    sin_B1TD,
    lengths_B,
    dmc,
    forced,
    cache,
    layer,
    seq_ids_B,
    first,
    logits,
) -> ChunkKV:
    alpha_BGT, omega_BGT = layer_decisions(q_BHTD, k_BGTD, positions_BT, dmc, forced, logits)
    k0_BGTD = key_for_accumulation(k_BGTD, dmc)
    if first:
        ktilde_BGTD, vtilde_BGTD = windowed_partial_accumulation(
            k0_BGTD, v_BGTD, alpha_BGT.to(k_BGTD.dtype), omega_BGT, dmc.window_size
        )
    else:
        ktilde_BGTD, vtilde_BGTD = accumulate_after_context(
            k0_BGTD, v_BGTD, alpha_BGT, omega_BGT, cache, layer, seq_ids_B, dmc.window_size
        )
    keys_BGTD = rope_for_attention(ktilde_BGTD, cos_B1TD, sin_B1TD, dmc)
    return ChunkKV(keys_BGTD, vtilde_BGTD, k0_BGTD, v_BGTD, alpha_BGT, omega_BGT, lengths_B)


def accumulate_after_context(
    k0_BGTD, v_BGTD, alpha_BGT, omega_BGT, cache, layer, seq_ids_B, window
):
    """Partial accumulations of a chunk whose first run may continue the cached open run.

    The ring's last W contributions are prepended as tokens (oldest first; the run's
    opening token appends, entries before it have weight 0), then cut off again.
    """
    context = cache.window_context(layer, seq_ids_B)
    dtype = k0_BGTD.dtype
    run_pos_BGW = (
        context.run_len_BG[..., None] - window + torch.arange(window, device=k0_BGTD.device)
    )
    ctx_alpha_BGW = (run_pos_BGW > 0).to(dtype)
    k_BGTD = torch.cat([context.k_BGWD.to(dtype), k0_BGTD], dim=2)
    v_BGTD = torch.cat([context.v_BGWD.to(dtype), v_BGTD], dim=2)
    alpha_all_BGT = torch.cat([ctx_alpha_BGW, alpha_BGT.to(dtype)], dim=2)
    omega_all_BGT = torch.cat([context.w_BGW.to(dtype), omega_BGT], dim=2)
    ktilde_BGTD, vtilde_BGTD = windowed_partial_accumulation(
        k_BGTD, v_BGTD, alpha_all_BGT, omega_all_BGT, window
    )
    return ktilde_BGTD[:, :, window:], vtilde_BGTD[:, :, window:]


def _first_chunk_attention(q_rot_BHTD: torch.Tensor, chunk: ChunkKV) -> torch.Tensor:
    if not bool(chunk.alpha_BGT.any()):
        group = q_rot_BHTD.shape[1] // chunk.keys_BGTD.shape[1]
        keys_BHTD = chunk.keys_BGTD.repeat_interleave(group, dim=1)
        values_BHTD = chunk.values_BGTD.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q_rot_BHTD, keys_BHTD, values_BHTD, is_causal=True)
    bias_BGT = attention_bias(chunk.alpha_BGT.to(q_rot_BHTD.dtype), hard=True)
    return dmc_attention(q_rot_BHTD, chunk.keys_BGTD, chunk.values_BGTD, bias_BGT)


def _delayed_first_chunk_attention(q_rot_BHTD, chunk: ChunkKV, cos_B1TD, sin_B1TD, dmc):
    """The parallel form with a merge delay: biased slots plus the exact recent window."""
    bias_BGT = attention_bias(chunk.alpha_BGT.to(q_rot_BHTD.dtype), hard=True)
    return dmc_attention(
        q_rot_BHTD,
        chunk.keys_BGTD,
        chunk.values_BGTD,
        bias_BGT,
        k_BGTD=rope_for_attention(chunk.k_BGTD, cos_B1TD, sin_B1TD, dmc),
        v_BGTD=chunk.v_BGTD,
        merge_delay=dmc.merge_delay,
    )


def _attention_with_prefix(q_rot_BHTD, chunk: ChunkKV, hidden_prefix_BG, cache, layer, seq_ids_B):
    """Scores over [cached slots, chunk partial accumulations], materialised per chunk.

    The cached open slot is hidden when the chunk's first token merges into it; inside the
    chunk, accumulation j is hidden from later queries when token j+1 merges into it.
    """
    batch, num_heads, length, head_dim = q_rot_BHTD.shape
    num_groups = chunk.keys_BGTD.shape[1]
    keys_BGSD, values_BGSD, valid_BGS = cache.gather(layer, seq_ids_B)
    open_BGS = torch.arange(valid_BGS.shape[-1], device=valid_BGS.device) == (
        valid_BGS.sum(-1, keepdim=True) - 1
    )
    visible_BGS = valid_BGS & ~(open_BGS & hidden_prefix_BG[..., None])
    next_alpha_BGT = torch.cat(
        [chunk.alpha_BGT[..., 1:], torch.zeros_like(chunk.alpha_BGT[..., :1])], -1
    )
    t_T = torch.arange(length, device=q_rot_BHTD.device)
    below_TT = t_T[:, None] > t_T[None, :]
    visible_BGTT = (below_TT & ~next_alpha_BGT[:, :, None, :]) | torch.eye(
        length, dtype=torch.bool, device=t_T.device
    )
    visible_BGTX = torch.cat(
        [visible_BGS[:, :, None].expand(-1, -1, length, -1), visible_BGTT], dim=-1
    )

    keys_BGXD = torch.cat([keys_BGSD.to(q_rot_BHTD.dtype), chunk.keys_BGTD], dim=2)
    values_BGXD = torch.cat([values_BGSD.to(q_rot_BHTD.dtype), chunk.values_BGTD], dim=2)
    group = num_heads // num_groups
    q_BGQD = q_rot_BHTD.reshape(batch, num_groups, group * length, head_dim)
    visible_BGQX = visible_BGTX[:, :, None].expand(-1, -1, group, -1, -1).flatten(2, 3)
    out_BGQD = F.scaled_dot_product_attention(
        q_BGQD, keys_BGXD, values_BGXD, attn_mask=visible_BGQX
    )
    return out_BGQD.view(batch, num_heads, length, head_dim)
