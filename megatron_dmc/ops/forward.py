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
    force_first_append,
    rope_without_decision_channel,
    rope_without_query_decision_channel,
    zero_decision_channel,
)
from megatron_dmc.ops.heads import (
    DecisionLogits,
    channel_decision_logits,
    importance_from_logits,
    query_decision_logits,
)
from megatron_dmc.ops.relaxation import eval_decisions, gumbel_sigmoid, straight_through
from megatron_dmc.ops.rope import apply_rope


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
    logits: DecisionLogits | None = None,
) -> DMCDecisions:
    """Alpha (Gumbel-sigmoid in training, hard in eval; first token appends) and omega.

    `logits` are required in heads mode (`decision_head_logits`); in channel mode they
    default to `channel_decision_logits(q, k)`. `noise_BGT` (Logistic(0, 1), training only)
    replaces the draw from `generator`.
    """
    logits = resolve_decision_logits(q_BHTD, k_BGTD, config, logits)
    omega_BGT = importance_from_logits(logits.omega_BGT)
    if training:
        alpha_BGT = force_first_append(
            gumbel_sigmoid(logits.alpha_BGT, config.temperature, generator, noise_BGT)
        )
        return DMCDecisions(alpha_BGT, straight_through(alpha_BGT), omega_BGT)
    alpha_BGT = force_first_append(eval_decisions(logits.alpha_BGT))
    return DMCDecisions(alpha_BGT, alpha_BGT, omega_BGT)


def resolve_decision_logits(
    q_BHTD: torch.Tensor, k_BGTD: torch.Tensor, config: DMCConfig, logits: DecisionLogits | None
) -> DecisionLogits:
    """The layer's logits (given, or read from q and k) with the decision threshold applied."""
    logits = _source_logits(q_BHTD, k_BGTD, config, logits)
    if config.decision_threshold == 0.0:
        return logits
    return DecisionLogits(logits.alpha_BGT - config.decision_threshold, logits.omega_BGT)


def _source_logits(
    q_BHTD: torch.Tensor, k_BGTD: torch.Tensor, config: DMCConfig, logits: DecisionLogits | None
) -> DecisionLogits:
    if logits is None and config.uses_query:
        return query_decision_logits(q_BHTD, k_BGTD.shape[1], config.init_val)
    if logits is None:
        if not config.uses_channel:
            raise ValueError(
                "decision_source='heads' needs the head logits: pass "
                "logits=decision_head_logits(x, weight, config.init_val)"
            )
        return channel_decision_logits(q_BHTD, k_BGTD, config.init_val)
    if logits.alpha_BGT.shape != k_BGTD.shape[:3] or logits.omega_BGT.shape != k_BGTD.shape[:3]:
        raise ValueError(
            f"logits must be [batch, kv_heads, time] = {tuple(k_BGTD.shape[:3])}; got "
            f"{tuple(logits.alpha_BGT.shape)} and {tuple(logits.omega_BGT.shape)}"
        )
    return logits


def key_for_accumulation(k_BGTD: torch.Tensor, config: DMCConfig) -> torch.Tensor:
    """Pre-RoPE keys as they enter the slots: channel D-1 zeroed in channel mode only."""
    return zero_decision_channel(k_BGTD) if config.uses_channel else k_BGTD


def slot_keys_values(
    k_in_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    alpha_BGT: torch.Tensor,
    omega_BGT: torch.Tensor,
    config: DMCConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What slot j holds: DMC's partial accumulations; DMS's token j itself (no merging:
    a decision only hides the previous token through the bias)."""
    if config.evicts:
        return k_in_BGTD, v_BGTD
    return windowed_partial_accumulation(
        k_in_BGTD, v_BGTD, alpha_BGT, omega_BGT, config.window_size
    )


def rope_for_attention(
    x_BHTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor, config: DMCConfig
) -> torch.Tensor:
    """RoPE of q or of a key: without channel D-1 in channel mode, plain in heads mode."""
    if config.uses_channel:
        return rope_without_decision_channel(x_BHTD, cos_TD, sin_TD)
    return apply_rope(x_BHTD, cos_TD, sin_TD)


def rope_for_query(
    q_BHTD: torch.Tensor,
    cos_TD: torch.Tensor,
    sin_TD: torch.Tensor,
    config: DMCConfig,
    num_kv_heads: int,
) -> torch.Tensor:
    """RoPE of the queries: as `rope_for_attention`, except with DMS's query neuron
    (decision_source "query"), zeroed in each group's first head only (keys untouched)."""
    if config.uses_query:
        return rope_without_query_decision_channel(q_BHTD, cos_TD, sin_TD, num_kv_heads)
    return rope_for_attention(q_BHTD, cos_TD, sin_TD, config)


def dmc_self_attention(
    q_BHTD: torch.Tensor,
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    cos_TD: torch.Tensor,
    sin_TD: torch.Tensor,
    config: DMCConfig,
    training: bool,
    generator: torch.Generator | None = None,
    logits: DecisionLogits | None = None,
) -> tuple[torch.Tensor, DMCDecisions]:
    """Decisions, channel zeroing (channel mode), windowed accumulation (DMS: none), RoPE at each slot's
    newest token, then attention with the DMC bias (and, with a merge delay, the exact
    window). Returns ([B, H, T, D], decisions); the decisions are those of every token,
    `counted_decisions` gives the ones that have taken effect."""
    check_qkv(q_BHTD, k_BGTD, v_BGTD)
    decisions = make_decisions(q_BHTD, k_BGTD, config, training, generator, logits=logits)
    k_in_BGTD = key_for_accumulation(k_BGTD, config)
    ktilde_BGTD, vtilde_BGTD = slot_keys_values(
        k_in_BGTD, v_BGTD, decisions.alpha_BGT, decisions.omega_BGT, config
    )
    q_rot_BHTD = rope_for_query(q_BHTD, cos_TD, sin_TD, config, k_BGTD.shape[1])
    k_rot_BGTD = rope_for_attention(ktilde_BGTD, cos_TD, sin_TD, config)
    bias_BGT = attention_bias(decisions.alpha_BGT, hard=not training)
    exact = {}
    if config.merge_delay:
        exact = dict(
            k_BGTD=rope_for_attention(k_in_BGTD, cos_TD, sin_TD, config),
            v_BGTD=v_BGTD,
            merge_delay=config.merge_delay,
        )
    out_BHTD = dmc_attention(q_rot_BHTD, k_rot_BGTD, vtilde_BGTD, bias_BGT, **exact)
    return out_BHTD, decisions
