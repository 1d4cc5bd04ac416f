"""Causal attention over partial accumulations with the DMC bias.

Legend: B batch, H query heads, G KV heads, T time, D head dim.

Score of query i on partial accumulation j (spec section 3):
    s_ij = q_i . ktilde_j * scale + b_j   for j < i,  b_j = log(1 - alpha_{j+1})
    s_ii = q_i . ktilde_i * scale          (a query always sees its own slot)
    masked for j > i.
In eval mode b_j = HARD_MASK_VALUE * alpha_{j+1} with hard alpha.

Delayed merging (merge delay W > 0; exact keys k_j and values v_j given as well): query i
attends the exact k_j, v_j for i-W < j <= i, and the partial accumulations of the tokens
that have left the window: ktilde_j with bias b_j for j < i-W, ktilde_{i-W} unbiased (the
open slot), nothing for j > i-W. W = 0 is the form above.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_dmc.ops._checks import check_qkv, check_rank
from megatron_dmc.ops.window import local_attention

HARD_MASK_VALUE = -1.0e4
"""exp(-1e4) is exactly 0 in every float dtype, so hard masking is exact."""


def attention_bias(alpha_BGT: torch.Tensor, hard: bool) -> torch.Tensor:
    """b_j from alpha_{j+1}; the last position has no successor, so its bias is 0."""
    check_rank("alpha", alpha_BGT, 3, "[batch, kv_heads, time]")
    next_alpha_BGT = torch.cat([alpha_BGT[..., 1:], torch.zeros_like(alpha_BGT[..., :1])], dim=-1)
    if hard:
        return HARD_MASK_VALUE * next_alpha_BGT
    return torch.log((1.0 - next_alpha_BGT).clamp_min(torch.finfo(alpha_BGT.dtype).tiny))


def _expand_groups(x_BGT_: torch.Tensor, num_heads: int) -> torch.Tensor:
    return x_BGT_.repeat_interleave(num_heads // x_BGT_.shape[1], dim=1)


def _check_bias(bias_BGT: torch.Tensor, k_BGTD: torch.Tensor) -> None:
    if bias_BGT.shape != k_BGTD.shape[:3]:
        raise ValueError(
            f"bias shape {tuple(bias_BGT.shape)} must be [batch, kv_heads, time] = "
            f"{tuple(k_BGTD.shape[:3])}"
        )


def _check_exact(
    ktilde_BGTD: torch.Tensor,
    k_BGTD: torch.Tensor | None,
    v_BGTD: torch.Tensor | None,
    vtilde_BGTD: torch.Tensor,
    merge_delay: int,
) -> None:
    if not isinstance(merge_delay, int) or merge_delay < 0:
        raise ValueError(f"merge_delay must be an integer >= 0; got {merge_delay!r}")
    if merge_delay == 0:
        return
    if k_BGTD is None or v_BGTD is None:
        raise ValueError("merge_delay > 0 needs the exact (RoPE'd) keys and the values too")
    if k_BGTD.shape != ktilde_BGTD.shape or v_BGTD.shape != vtilde_BGTD.shape:
        raise ValueError(
            f"exact k {tuple(k_BGTD.shape)} / v {tuple(v_BGTD.shape)} must match ktilde "
            f"{tuple(ktilde_BGTD.shape)} / vtilde {tuple(vtilde_BGTD.shape)}"
        )


def dmc_attention_reference(
    q_BHTD: torch.Tensor,
    ktilde_BGTD: torch.Tensor,
    vtilde_BGTD: torch.Tensor,
    bias_BGT: torch.Tensor,
    scale: float | None = None,
    k_BGTD: torch.Tensor | None = None,
    v_BGTD: torch.Tensor | None = None,
    merge_delay: int = 0,
) -> torch.Tensor:
    """Plain reference: materialises the [B, H, T, T] (delayed: [B, H, T, 2T]) scores."""
    check_qkv(q_BHTD, ktilde_BGTD, vtilde_BGTD)
    _check_bias(bias_BGT, ktilde_BGTD)
    _check_exact(ktilde_BGTD, k_BGTD, v_BGTD, vtilde_BGTD, merge_delay)
    num_heads, length, head_dim = q_BHTD.shape[1], q_BHTD.shape[2], q_BHTD.shape[3]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    k_BHTD = _expand_groups(ktilde_BGTD, num_heads)
    v_BHTD = _expand_groups(vtilde_BGTD, num_heads)
    bias_BH1T = _expand_groups(bias_BGT, num_heads)[:, :, None, :]
    scores_BHTT = q_BHTD @ k_BHTD.transpose(-1, -2) * scale
    ones_TT = torch.ones(length, length, dtype=torch.bool, device=q_BHTD.device)
    below_TT = ones_TT.tril(-1 - merge_delay)
    open_TT = ones_TT.tril(-merge_delay) & ~below_TT
    scores_BHTT = torch.where(below_TT, scores_BHTT + bias_BH1T, scores_BHTT)
    scores_BHTT = scores_BHTT.masked_fill(~(below_TT | open_TT), float("-inf"))
    if merge_delay == 0:
        return torch.softmax(scores_BHTT, dim=-1) @ v_BHTD
    window_TT = ones_TT.tril() & ~ones_TT.tril(-merge_delay)
    exact_BHTT = q_BHTD @ _expand_groups(k_BGTD, num_heads).transpose(-1, -2) * scale
    exact_BHTT = exact_BHTT.masked_fill(~window_TT, float("-inf"))
    weights_BHTS = torch.softmax(torch.cat([scores_BHTT, exact_BHTT], dim=-1), dim=-1)
    return weights_BHTS @ torch.cat([v_BHTD, _expand_groups(v_BGTD, num_heads)], dim=2)


def dmc_attention(
    q_BHTD: torch.Tensor,
    ktilde_BGTD: torch.Tensor,
    vtilde_BGTD: torch.Tensor,
    bias_BGT: torch.Tensor,
    scale: float | None = None,
    k_BGTD: torch.Tensor | None = None,
    v_BGTD: torch.Tensor | None = None,
    merge_delay: int = 0,
) -> torch.Tensor:
    """The same attention through one causal SDPA call; no [T, T] bias is materialised.

    Two extra channels carry the bias and the unbiased "local" keys: the bias of key j
    rides in the dot product (q[D] = 1/scale, k_j[D] = b_j), and the local set of query i
    (its own slot; with merge delay W, the W exact keys plus the open slot ktilde_{i-W},
    see `ops.window`) becomes one "self" key placed first, which query i scores at exactly
    the local set's log-normaliser l_i (q_i[D+1] = l_i/scale, k_self[D+1] = 1). With the
    keys shifted right by W + 1 (masked fillers in between), the causal mask lets query i
    see the self key plus ktilde_0..ktilde_{i-W-1}. The self key's value is the one-hot
    extra channel, so that channel of the output is the local set's total softmax weight,
    which then scales the local set's own softmax output.
    """
    check_qkv(q_BHTD, ktilde_BGTD, vtilde_BGTD)
    _check_bias(bias_BGT, ktilde_BGTD)
    _check_exact(ktilde_BGTD, k_BGTD, v_BGTD, vtilde_BGTD, merge_delay)
    num_heads, length, head_dim = q_BHTD.shape[1], q_BHTD.shape[2], q_BHTD.shape[3]
    num_groups, value_dim = ktilde_BGTD.shape[1], vtilde_BGTD.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    per_group = (q_BHTD.shape[0], num_groups, num_heads // num_groups, length)
    local_out_BHTD = None
    if merge_delay == 0:
        if length <= 1:
            return _expand_groups(vtilde_BGTD, num_heads)
        # Each query head against its group's own slot, through [B, G, N, T, D] views
        # (no copy of the slots per query head).
        q_BGNTD = q_BHTD.reshape(*per_group, head_dim)
        local_BHT = (q_BGNTD * ktilde_BGTD[:, :, None]).sum(-1).reshape(q_BHTD.shape[:3]) * scale
    else:
        local_BHT, local_out_BHTD = local_attention(
            q_BHTD, ktilde_BGTD, vtilde_BGTD, k_BGTD, v_BGTD, merge_delay, scale
        )
        if merge_delay + 1 >= length:
            return local_out_BHTD

    q_aug_BHTE = torch.cat(
        [q_BHTD, torch.full_like(q_BHTD[..., :1], 1.0 / scale), local_BHT[..., None] / scale],
        dim=-1,
    )
    k_aug_BGTE = torch.cat(
        [ktilde_BGTD, bias_BGT[..., None], torch.zeros_like(bias_BGT[..., None])], dim=-1
    )
    k_self_BG1E = torch.zeros_like(k_aug_BGTE[:, :, :1])
    k_self_BG1E[..., -1] = 1.0
    shifted = length - 1 - merge_delay
    keys = [k_self_BG1E, k_aug_BGTE[:, :, :shifted]]
    if merge_delay:
        k_fill_BGWE = torch.zeros_like(k_aug_BGTE[:, :, :merge_delay])
        k_fill_BGWE[..., head_dim] = HARD_MASK_VALUE
        keys.insert(1, k_fill_BGWE)
    keys_BGSE = torch.cat(keys, dim=2)

    # Values get the same width as q/k (one-hot channel + one zero channel): the CPU and
    # GPU fused SDPA kernels fall back to the O(T^2) math path when widths differ.
    v_aug_BGTF = F.pad(vtilde_BGTD, (0, q_aug_BHTE.shape[-1] - value_dim))
    v_self_BG1F = torch.zeros_like(v_aug_BGTF[:, :, :1])
    v_self_BG1F[..., value_dim] = 1.0
    values = [v_self_BG1F, v_aug_BGTF[:, :, :shifted]]
    if merge_delay:
        values.insert(1, torch.zeros_like(v_aug_BGTF[:, :, :merge_delay]))
    values_BGSF = torch.cat(values, dim=2)

    out_BHTF = _causal_sdpa(q_aug_BHTE, keys_BGSE, values_BGSF, scale, num_heads // num_groups)
    self_weight_BHT1 = out_BHTF[..., value_dim : value_dim + 1]
    if local_out_BHTD is not None:
        return out_BHTF[..., :value_dim] + self_weight_BHT1 * local_out_BHTD
    # Without a delay the local output is the group's own slot value: added per group.
    out_BGNTF = out_BHTF.reshape(*per_group, -1)
    local_BGNTD = out_BGNTF[..., value_dim : value_dim + 1] * vtilde_BGTD[:, :, None]
    return (out_BGNTF[..., :value_dim] + local_BGNTD).reshape(*q_BHTD.shape[:3], value_dim)


def _causal_sdpa(
    q_BHTE: torch.Tensor, k_BGSE: torch.Tensor, v_BGSF: torch.Tensor, scale: float, group: int
) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        q_BHTE, k_BGSE, v_BGSF, is_causal=True, scale=scale, enable_gqa=group > 1
    )
