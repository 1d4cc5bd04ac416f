"""Decision and importance logits, from the repurposed channel or from separate heads.

Legend: B batch, H query heads, G KV heads, T time, D head dim, C attention input width,
N = 2G rows of the decision-head weight.

Both sources give per (token, KV head) an alpha logit (eval: merge iff > 0) and an omega
logit (omega = sigmoid(logit) + eps):
- channel (the paper): alpha logit = k[D-1] - c, omega logit = mean_group q[D-1] + c.
- heads (DMS's `dms_separate_alpha` pattern, applied to both): with y = scale * (W x),
  x the attention input after the input norm and W the [2G, C] weight (rows 0..G-1 alpha
  of KV head g, rows G..2G-1 omega of KV head g), alpha logit = y[g] - c and omega logit =
  y[G+g] + c. A zero W gives alpha logit -c (eval: all append; training: alpha ~ 0.0067)
  and uniform omega, exactly as a freshly zeroed channel does, while q and k stay intact.
  One omega row per KV head: the paper's average over the group's query heads of a linear
  function is itself a linear function, so nothing is lost.
- query (DMS's `dms_separate_alpha=False`): alpha logit of KV head g = scale * q[gR, D-1] - c,
  channel D-1 of the group's first query head (R = H/G), pre-RoPE; omega logit the constant
  +c (DMS keeps one token per slot, so omega cancels).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from megatron_dmc.ops._checks import check_groups, check_rank

HEAD_LOGIT_SCALE = 100.0
"""Multiplier of the decision heads' output (DMS uses 100): ordinary learning rates move
the logits at a useful speed from a zero initialisation."""


class DecisionLogits(NamedTuple):
    alpha_BGT: torch.Tensor
    """Merge logit: hard alpha = 1 (accumulate) iff > 0."""

    omega_BGT: torch.Tensor
    """Importance logit: omega = sigmoid(logit) + eps."""


def channel_decision_logits(
    q_BHTD: torch.Tensor, k_BGTD: torch.Tensor, init_val: float
) -> DecisionLogits:
    """The paper's logits from channel D-1 (query heads grouped contiguously per KV head)."""
    check_rank("q", q_BHTD, 4, "[batch, heads, time, head_dim]")
    check_rank("k", k_BGTD, 4, "[batch, kv_heads, time, head_dim]")
    b, h, t, _ = q_BHTD.shape
    g = k_BGTD.shape[1]
    check_groups(h, g)
    qbar_BGT = q_BHTD[..., -1].reshape(b, g, h // g, t).mean(dim=2)
    return DecisionLogits(k_BGTD[..., -1] - init_val, qbar_BGT + init_val)


def query_decision_logits(
    q_BHTD: torch.Tensor, num_kv_heads: int, init_val: float, scale: float = HEAD_LOGIT_SCALE
) -> DecisionLogits:
    """DMS's repurposed query neuron: alpha = scale * q[first head of the group, D-1] - c."""
    check_rank("q", q_BHTD, 4, "[batch, heads, time, head_dim]")
    check_groups(q_BHTD.shape[1], num_kv_heads)
    alpha_BGT = q_BHTD[:, :: q_BHTD.shape[1] // num_kv_heads, :, -1] * scale - init_val
    return DecisionLogits(alpha_BGT, torch.full_like(alpha_BGT.detach(), init_val))


def decision_head_logits(
    x_BTC: torch.Tensor,
    weight_NC: torch.Tensor,
    init_val: float,
    scale: float = HEAD_LOGIT_SCALE,
) -> DecisionLogits:
    """Logits from the decision heads: alpha = scale * W[:G] x - c, omega = scale * W[G:] x + c."""
    check_rank("x", x_BTC, 3, "[batch, time, hidden]")
    check_rank("weight", weight_NC, 2, "[2 * kv_heads, hidden]")
    if weight_NC.shape[0] % 2 or weight_NC.shape[1] != x_BTC.shape[-1]:
        raise ValueError(
            f"decision-head weight must be [2 * kv_heads, hidden={x_BTC.shape[-1]}]; "
            f"got {tuple(weight_NC.shape)}"
        )
    return head_logits_from_outputs(x_BTC @ weight_NC.t(), init_val, scale)


def head_logits_from_outputs(
    y_BTN: torch.Tensor, init_val: float, scale: float = HEAD_LOGIT_SCALE
) -> DecisionLogits:
    """The logits from the heads' raw outputs W x [B, T, 2G] (e.g. of a fused projection)."""
    alpha_BGT, omega_BGT = (y_BTN.transpose(1, 2) * scale).chunk(2, dim=1)
    return DecisionLogits(alpha_BGT - init_val, omega_BGT + init_val)


def importance_from_logits(omega_logits_BGT: torch.Tensor) -> torch.Tensor:
    """omega = sigmoid(logit) + eps (the release's guard against zero weights)."""
    return torch.sigmoid(omega_logits_BGT) + torch.finfo(omega_logits_BGT.dtype).eps
