"""Stage 1 ("zero_out"): plain causal attention with channel D-1 of q and k scaled by lambda.

With DMS's query neuron (`decision_source="query"`) only the repurposed channel is scaled:
D-1 of the first query head of each KV group (keys untouched), so the stage ends with that
neuron at 0, i.e. decision logit 100 * 0 - c: nothing evicted at the first DMS step.

The scaling is applied before RoPE (in `_adjust_key_value_for_inference`) and after it
(in the core attention), exactly where DMC zeroes the channel. lambda = 1 is the
original model bit for bit; lambda = 0 is the model DMC starts from. The trainer sets
lambda every step with `set_zero_out_lambda(model, lam)`.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.transformer.attention import SelfAttention

from megatron_dmc.model.layout import scale_decision_channel, scale_query_decision_channel

ZERO_OUT_SOURCES = ("channel", "query")
"""Decision sources whose repurposed channel the stage anneals."""


def scale_repurposed(query, key, lam: float, source: str):
    """(query, key) [S, B, heads, D] with the repurposed channel scaled by lam."""
    if source == "query":
        return scale_query_decision_channel(query, key.shape[2], lam), key
    return scale_decision_channel(query, lam), scale_decision_channel(key, lam)


class ZeroOutSelfAttention(SelfAttention):
    """`SelfAttention` with the repurposed channel scaled by `zero_out_lambda` before RoPE."""

    zero_out_lambda: float = 1.0

    def __init__(self, *args, decision_source: str = "channel", **kwargs) -> None:
        if decision_source not in ZERO_OUT_SOURCES:
            raise ValueError(
                f"zero_out anneals a repurposed channel ({ZERO_OUT_SOURCES}); decision_source "
                f"{decision_source!r} has none"
            )
        super().__init__(*args, **kwargs)
        self.decision_source = decision_source
        self.core_attention.decision_source = decision_source

    def _adjust_key_value_for_inference(
        self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
    ):
        query, key = scale_repurposed(query, key, self.zero_out_lambda, self.decision_source)
        return super()._adjust_key_value_for_inference(
            inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
        )


class _ZeroOutCore:
    """Mixin over a core-attention class: scale the repurposed channel after RoPE."""

    zero_out_lambda: float = 1.0
    decision_source: str = "channel"

    def forward(self, query: torch.Tensor, key: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        query, key = scale_repurposed(query, key, self.zero_out_lambda, self.decision_source)
        return super().forward(query, key, *args, **kwargs)


@functools.cache
def zero_out_core_attention(base: type) -> type:
    """The core-attention class `base` (local or Transformer-Engine) with post-RoPE scaling."""
    return type(f"ZeroOut{base.__name__}", (_ZeroOutCore, base), {})


def set_zero_out_lambda(model: torch.nn.Module, lam: float) -> int:
    """Set lambda on every zero_out attention of `model`; returns how many were set."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"zero_out lambda must lie in [0, 1]; got {lam!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, (ZeroOutSelfAttention, _ZeroOutCore)):
            module.zero_out_lambda = float(lam)
            count += isinstance(module, ZeroOutSelfAttention)
    return count
