"""Decision (alpha) and importance (omega) from the repurposed channel D-1.

Legend: B batch, H query heads, G KV heads, T time, D head dim.
See spec section 1: alpha logit = k[D-1] - c; omega = sigmoid(mean_group(q[D-1]) + c) + eps.
"""

from __future__ import annotations

import torch

from megatron_dmc.ops._checks import check_groups, check_rank
from megatron_dmc.ops.rope import apply_rope


def decision_logits(k_BGTD: torch.Tensor, init_val: float) -> torch.Tensor:
    """l_t = k_t[D-1] - c; alpha_t = 1 (merge) iff l_t > 0. Shape [B, G, T]."""
    check_rank("k", k_BGTD, 4, "[batch, kv_heads, time, head_dim]")
    return k_BGTD[..., -1] - init_val


def importance_weights(q_BHTD: torch.Tensor, num_kv_heads: int, init_val: float) -> torch.Tensor:
    """omega_t = sigmoid(qbar_t[D-1] + c) + eps, qbar averaged over a KV group. Shape [B, G, T].

    Query heads are grouped contiguously: KV head g serves query heads
    g*H/G ... (g+1)*H/G - 1 (the HF `repeat_kv` and Megatron-Core convention).
    """
    check_rank("q", q_BHTD, 4, "[batch, heads, time, head_dim]")
    b, h, t, _ = q_BHTD.shape
    check_groups(h, num_kv_heads)
    qbar_BGT = q_BHTD[..., -1].reshape(b, num_kv_heads, h // num_kv_heads, t).mean(dim=2)
    return torch.sigmoid(qbar_BGT + init_val) + torch.finfo(q_BHTD.dtype).eps


def zero_decision_channel(x: torch.Tensor) -> torch.Tensor:
    """A copy of x with channel D-1 set to 0 (differentiable, out of place)."""
    return torch.cat([x[..., :-1], torch.zeros_like(x[..., -1:])], dim=-1)


def zero_query_decision_channel(q_BHTD: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """A copy of q with channel D-1 of the first query head of each KV group set to 0 (DMS's
    query neuron; the other heads keep theirs). Heads on axis 1, channels last ([B, H, D]
    works too). Differentiable, out of place."""
    heads = q_BHTD.shape[1]
    check_groups(heads, num_kv_heads)
    keep_HD = torch.ones(heads, q_BHTD.shape[-1], dtype=q_BHTD.dtype, device=q_BHTD.device)
    keep_HD[:: heads // num_kv_heads, -1] = 0.0
    return q_BHTD * keep_HD.view(heads, *[1] * (q_BHTD.dim() - 3), -1)


def rope_without_query_decision_channel(
    q_BHTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor, num_kv_heads: int
) -> torch.Tensor:
    """DMS's query neuron out of attention: zeroed in the first head of each group before
    and after rotate-half RoPE (as `rope_without_decision_channel` does for every head)."""
    rotated_BHTD = apply_rope(zero_query_decision_channel(q_BHTD, num_kv_heads), cos_TD, sin_TD)
    return zero_query_decision_channel(rotated_BHTD, num_kv_heads)


def rope_without_decision_channel(
    x_BHTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor
) -> torch.Tensor:
    """Zero channel D-1, rotate-half RoPE, zero channel D-1 again (exactly as the release).

    Channel D/2-1 is rotated against a zero partner, so it becomes x[D/2-1] * cos.
    """
    return zero_decision_channel(apply_rope(zero_decision_channel(x_BHTD), cos_TD, sin_TD))


def force_first_append(alpha_BGT: torch.Tensor) -> torch.Tensor:
    """The first token of a sequence always opens a slot: alpha_0 = 0."""
    return torch.cat([torch.zeros_like(alpha_BGT[..., :1]), alpha_BGT[..., 1:]], dim=-1)
