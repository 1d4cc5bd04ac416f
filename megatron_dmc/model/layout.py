"""Megatron-Core's [s, b, heads, d] layout <-> the ops' [b, heads, s, d] layout (views).

Legend: S sequence (time), B batch, H query heads, G KV heads, D head dim, T = S.
"""

from __future__ import annotations

import torch


def to_bhtd(x_SBHD: torch.Tensor) -> torch.Tensor:
    return x_SBHD.permute(1, 2, 0, 3)


def to_sbhd(x_BHTD: torch.Tensor) -> torch.Tensor:
    return x_BHTD.permute(2, 0, 1, 3)


def scale_decision_channel(x: torch.Tensor, factor: float) -> torch.Tensor:
    """A copy of x with channel D-1 multiplied by `factor` (x itself when factor is 1)."""
    if factor == 1.0:
        return x
    return torch.cat([x[..., :-1], x[..., -1:] * factor], dim=-1)


def scale_query_decision_channel(
    x_SBHD: torch.Tensor, num_groups: int, factor: float
) -> torch.Tensor:
    """A copy of queries x with channel D-1 of the first head of each of `num_groups` KV
    groups multiplied by `factor` (DMS's query neuron; x itself when factor is 1)."""
    if factor == 1.0:
        return x_SBHD
    scale_HD = torch.ones(x_SBHD.shape[-2:], dtype=x_SBHD.dtype, device=x_SBHD.device)
    scale_HD[:: x_SBHD.shape[-2] // num_groups, -1] = factor
    return x_SBHD * scale_HD
