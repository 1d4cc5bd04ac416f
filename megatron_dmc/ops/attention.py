"""Causal attention over partial accumulations with the DMC bias.

Legend: B batch, H query heads, G KV heads, T time, D head dim.

Score of query i on partial accumulation j (spec section 3):
    s_ij = q_i . ktilde_j * scale + b_j   for j < i,  b_j = log(1 - alpha_{j+1})
    s_ii = q_i . ktilde_i * scale          (a query always sees its own slot)
    masked for j > i.
In eval mode b_j = HARD_MASK_VALUE * alpha_{j+1} with hard alpha.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_dmc.ops._checks import check_qkv, check_rank

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


def dmc_attention_reference(
    q_BHTD: torch.Tensor,
    ktilde_BGTD: torch.Tensor,
    vtilde_BGTD: torch.Tensor,
    bias_BGT: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain reference: materialises the [B, H, T, T] score and bias matrices."""
    check_qkv(q_BHTD, ktilde_BGTD, vtilde_BGTD)
    _check_bias(bias_BGT, ktilde_BGTD)
    num_heads, length, head_dim = q_BHTD.shape[1], q_BHTD.shape[2], q_BHTD.shape[3]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    k_BHTD = _expand_groups(ktilde_BGTD, num_heads)
    v_BHTD = _expand_groups(vtilde_BGTD, num_heads)
    bias_BH1T = _expand_groups(bias_BGT, num_heads)[:, :, None, :]
    scores_BHTT = q_BHTD @ k_BHTD.transpose(-1, -2) * scale
    below_TT = torch.ones(length, length, dtype=torch.bool, device=q_BHTD.device).tril(-1)
    diagonal_TT = torch.eye(length, dtype=torch.bool, device=q_BHTD.device)
    scores_BHTT = torch.where(below_TT, scores_BHTT + bias_BH1T, scores_BHTT)
    scores_BHTT = scores_BHTT.masked_fill(~(below_TT | diagonal_TT), float("-inf"))
    return torch.softmax(scores_BHTT, dim=-1) @ v_BHTD


def dmc_attention(
    q_BHTD: torch.Tensor,
    ktilde_BGTD: torch.Tensor,
    vtilde_BGTD: torch.Tensor,
    bias_BGT: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """The same attention through one causal SDPA call; no [T, T] bias is materialised.

    Two extra channels carry the bias and the diagonal: the bias of key j rides in the dot
    product (q[D] = 1/scale, k_j[D] = b_j), and the unbiased own-slot term becomes a
    "self" key placed first, which query i scores at exactly s_ii (q_i[D+1] = s_ii/scale,
    k_self[D+1] = 1). With the keys shifted right by one, the causal mask lets query i see
    the self key plus ktilde_0..ktilde_{i-1}. The self key's value is the one-hot extra
    channel, so that channel of the output is the softmax weight of the own slot, which
    then scales vtilde_i.
    """
    check_qkv(q_BHTD, ktilde_BGTD, vtilde_BGTD)
    _check_bias(bias_BGT, ktilde_BGTD)
    num_heads, head_dim = q_BHTD.shape[1], q_BHTD.shape[3]
    num_groups, value_dim = ktilde_BGTD.shape[1], vtilde_BGTD.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    vtilde_BHTD = _expand_groups(vtilde_BGTD, num_heads)
    self_score_BHT = (q_BHTD * _expand_groups(ktilde_BGTD, num_heads)).sum(-1) * scale

    q_aug_BHTE = torch.cat(
        [q_BHTD, torch.full_like(q_BHTD[..., :1], 1.0 / scale), self_score_BHT[..., None] / scale],
        dim=-1,
    )
    k_aug_BGTE = torch.cat(
        [ktilde_BGTD, bias_BGT[..., None], torch.zeros_like(bias_BGT[..., None])], dim=-1
    )
    k_self_BG1E = torch.zeros_like(k_aug_BGTE[:, :, :1])
    k_self_BG1E[..., -1] = 1.0
    keys_BGSE = torch.cat([k_self_BG1E, k_aug_BGTE[:, :, :-1]], dim=2)

    # Values get the same width as q/k (one-hot channel + one zero channel): the CPU and
    # GPU fused SDPA kernels fall back to the O(T^2) math path when widths differ.
    v_aug_BGTF = F.pad(vtilde_BGTD, (0, q_aug_BHTE.shape[-1] - value_dim))
    v_self_BG1F = torch.zeros_like(v_aug_BGTF[:, :, :1])
    v_self_BG1F[..., value_dim] = 1.0
    values_BGSF = torch.cat([v_self_BG1F, v_aug_BGTF[:, :, :-1]], dim=2)

    out_BHTF = _causal_sdpa(q_aug_BHTE, keys_BGSE, values_BGSF, scale, num_heads // num_groups)
    self_weight_BHT1 = out_BHTF[..., value_dim : value_dim + 1]
    return out_BHTF[..., :value_dim] + self_weight_BHT1 * vtilde_BHTD


def _causal_sdpa(
    q_BHTE: torch.Tensor, k_BGSE: torch.Tensor, v_BGSF: torch.Tensor, scale: float, group: int
) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        q_BHTE, k_BGSE, v_BGSF, is_causal=True, scale=scale, enable_gqa=group > 1
    )
