"""Weight surgery on Megatron's fused QKV projection.

Legend: G KV groups on this TP rank, R rows per group (H/G query heads + 1 key + 1
value head), D head dim, I input (hidden) size.

`linear_qkv.weight` is [G * R * D, I]: per group, its query heads, then its key head,
then its value head. Tensor parallel splits whole groups across ranks, so the same
view works on every shard.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core.transformer.attention import SelfAttention

RowSelector = tuple[torch.nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]
"""A weight and a function that views, in any tensor shaped like it, the decision rows."""


@torch.no_grad()
def zero_decision_rows(model: torch.nn.Module) -> int:
    """Set to 0 the rows producing channel D-1 of every query and key head (the end of
    stage 1; with DMS's query neuron, of each group's first query head only). Returns the
    number of rows zeroed on this rank."""
    zeroed = 0
    for attention in model.modules():
        if isinstance(attention, SelfAttention):
            zeroed += _zero_rows(attention)
    return zeroed


def decision_row_selectors(model: torch.nn.Module) -> list[RowSelector]:
    """Per attention layer, the weights that produce the decision and importance logits:
    linear_qkv.weight and a view of its channel D-1 rows of every query and key head
    ([G, R-1, I]; DMS's query neuron: of each group's first query head, [G, 1, I]); in a
    layer with decision heads, the whole `dmc_decision_proj.weight`.
    Applicable to the weight or to optimizer state."""
    selectors = []
    for attention in model.modules():
        heads = getattr(attention, "dmc_decision_proj", None)
        if heads is not None:
            selectors.append((heads.weight, _whole))
        elif isinstance(attention, SelfAttention):
            selectors.append((attention.linear_qkv.weight, _row_view(attention)))
    return selectors


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _shape(attention: SelfAttention) -> tuple[int, int, int]:
    groups = attention.num_query_groups_per_partition
    rows = attention.num_attention_heads_per_partition // groups + 2
    return groups, rows, attention.hidden_size_per_attention_head


def _repurposed_heads(attention: SelfAttention, rows: int) -> slice:
    """The heads (rows of a group) whose channel D-1 is repurposed: every query and key
    head, or the first query head only (DMS's query neuron)."""
    config = getattr(attention, "dmc_config", None)
    source = getattr(attention, "decision_source", config.decision_source if config else None)
    return slice(0, 1) if source == "query" else slice(0, rows - 1)


def _row_view(attention: SelfAttention) -> Callable[[torch.Tensor], torch.Tensor]:
    groups, rows, head_dim = _shape(attention)
    heads = _repurposed_heads(attention, rows)

    def view(tensor_GRDI: torch.Tensor) -> torch.Tensor:
        return tensor_GRDI.view(groups, rows, head_dim, -1)[:, heads, head_dim - 1]

    return view


def _zero_rows(attention: SelfAttention) -> int:
    groups, rows, head_dim = _shape(attention)
    heads = _repurposed_heads(attention, rows)
    linear = attention.linear_qkv
    _row_view(attention)(linear.weight).zero_()
    bias = getattr(linear, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.numel() > 0:
        bias.view(groups, rows, head_dim)[:, heads, head_dim - 1] = 0.0
    return groups * len(range(rows)[heads])
