"""One layer's whole DMC attention from raw pre-RoPE q, k, v (the parallel training form).

Legend: B batch, H query heads, G KV heads, T time, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dmc.ops._checks import check_qkv
from megatron_dmc.ops.accumulate import windowed_partial_accumulation
from megatron_dmc.ops.attention import attention_bias, dmc_attention
from megatron_dmc.ops.config import DMCConfig
from megatron_dmc.ops.decisions import (
    decision_logits,
    force_first_append,
    importance_weights,
    rope_without_decision_channel,
    zero_decision_channel,
)
from megatron_dmc.ops.relaxation import eval_decisions, gumbel_sigmoid, straight_through


@dataclass
class DMCDecisions:
    alpha_BGT: torch.Tensor
    """The alpha used by accumulation and bias: relaxed in training, hard in eval."""

    alpha_ste_BGT: torch.Tensor
    """Hard 1[alpha > 0.5] in the forward pass, gradient of alpha in the backward pass."""

    omega_BGT: torch.Tensor
    """Importance weights of each token."""


def make_decisions(
    q_BHTD: torch.Tensor,
    k_BGTD: torch.Tensor,
    config: DMCConfig,
    training: bool,
    generator: torch.Generator | None = None,
    noise_BGT: torch.Tensor | None = None,
) -> DMCDecisions:
    """Alpha (Gumbel-sigmoid in training, hard in eval; first token appends) and omega.

    `noise_BGT` (Logistic(0, 1), training only) replaces the draw from `generator`.
    """
    logits_BGT = decision_logits(k_BGTD, config.init_value)
    omega_BGT = importance_weights(q_BHTD, k_BGTD.shape[1], config.init_value)
    if training:
        alpha_BGT = force_first_append(
            gumbel_sigmoid(logits_BGT, config.temperature, generator, noise_BGT)
        )
        return DMCDecisions(alpha_BGT, straight_through(alpha_BGT), omega_BGT)
    alpha_BGT = force_first_append(eval_decisions(logits_BGT))
    return DMCDecisions(alpha_BGT, alpha_BGT, omega_BGT)


def dmc_self_attention(
    q_BHTD: torch.Tensor,
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    cos_TD: torch.Tensor,
    sin_TD: torch.Tensor,
    config: DMCConfig,
    training: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, DMCDecisions]:
    """Decisions, channel zeroing, windowed accumulation, RoPE at each slot's newest token,
    zeroing again, then attention with the DMC bias. Returns ([B, H, T, D], decisions)."""
    check_qkv(q_BHTD, k_BGTD, v_BGTD)
    decisions = make_decisions(q_BHTD, k_BGTD, config, training, generator)
    ktilde_BGTD, vtilde_BGTD = windowed_partial_accumulation(
        zero_decision_channel(k_BGTD),
        v_BGTD,
        decisions.alpha_BGT,
        decisions.omega_BGT,
        config.window,
    )
    q_rot_BHTD = rope_without_decision_channel(q_BHTD, cos_TD, sin_TD)
    k_rot_BGTD = rope_without_decision_channel(ktilde_BGTD, cos_TD, sin_TD)
    bias_BGT = attention_bias(decisions.alpha_BGT, hard=not training)
    return dmc_attention(q_rot_BHTD, k_rot_BGTD, vtilde_BGTD, bias_BGT), decisions
