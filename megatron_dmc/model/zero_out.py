"""Stage 1 ("zero_out"): plain causal attention with channel D-1 of q and k scaled by lambda.

The scaling is applied before RoPE (in `_adjust_key_value_for_inference`) and after it
(in the core attention), exactly where DMC zeroes the channel. lambda = 1 is the
original model bit for bit; lambda = 0 is the model DMC starts from. The trainer sets
lambda every step with `set_zero_out_lambda(model, lam)`.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.transformer.attention import SelfAttention

from megatron_dmc.model.layout import scale_decision_channel


class ZeroOutSelfAttention(SelfAttention):
    """`SelfAttention` with channel D-1 of q and k scaled by `zero_out_lambda` before RoPE."""

    zero_out_lambda: float = 1.0

    def _adjust_key_value_for_inference(
        self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
    ):
        query = scale_decision_channel(query, self.zero_out_lambda)
        key = scale_decision_channel(key, self.zero_out_lambda)
        return super()._adjust_key_value_for_inference(
            inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
        )


class _ZeroOutCore:
    """Mixin over a core-attention class: scale channel D-1 of q and k after RoPE."""

    zero_out_lambda: float = 1.0

    def forward(self, query: torch.Tensor, key: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        query = scale_decision_channel(query, self.zero_out_lambda)
        key = scale_decision_channel(key, self.zero_out_lambda)
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
