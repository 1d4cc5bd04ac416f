"""Weight surgery on Megatron's fused QKV projection.

Legend: G KV groups on this TP rank, R rows per group (H/G query heads + 1 key + 1
value head), D head dim, I input (hidden) size.

`linear_qkv.weight` is [G * R * D, I]: per group, its query heads, then its key head,
then its value head. Tensor parallel splits whole groups across ranks, so the same
view works on every shard.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.attention import SelfAttention


@torch.no_grad()
def zero_decision_rows(model: torch.nn.Module) -> int:
    """Set to 0 the rows producing channel D-1 of every query and key head (the end of
    stage 1). Returns the number of rows zeroed on this rank."""
    zeroed = 0
    for attention in model.modules():
        if isinstance(attention, SelfAttention):
            zeroed += _zero_rows(attention)
    return zeroed


def _zero_rows(attention: SelfAttention) -> int:
    groups = attention.num_query_groups_per_partition
    rows = attention.num_attention_heads_per_partition // groups + 2
    head_dim = attention.hidden_size_per_attention_head
    linear = attention.linear_qkv
    weight_GRDI = linear.weight.view(groups, rows, head_dim, -1)
    weight_GRDI[:, : rows - 1, head_dim - 1] = 0.0
    bias = getattr(linear, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.numel() > 0:
        bias.view(groups, rows, head_dim)[:, : rows - 1, head_dim - 1] = 0.0
    return groups * (rows - 1)
