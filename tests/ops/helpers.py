"""Random DMC inputs with controlled decision patterns (fp64 by default)."""

from __future__ import annotations

import torch

from megatron_dmc.ops import rope_cos_sin

INIT_VALUE = 5.0


def merge_pattern(name: str, batch: int, groups: int, length: int, gen: torch.Generator):
    """1 = merge (accumulate), 0 = append, [B, G, T] bool."""
    if name == "all_append":
        return torch.zeros(batch, groups, length, dtype=torch.bool)
    if name == "all_merge":
        return torch.ones(batch, groups, length, dtype=torch.bool)
    if name == "alternating":
        return (torch.arange(length) % 2 == 1).expand(batch, groups, length).clone()
    if name == "long_runs":  # runs of 20 merges, longer than the 12-token window
        return (torch.arange(length) % 21 != 0).expand(batch, groups, length).clone()
    if name == "random":
        return torch.rand(batch, groups, length, generator=gen) < 0.6
    raise KeyError(name)


def random_qkv(
    batch: int,
    heads: int,
    groups: int,
    length: int,
    head_dim: int,
    pattern: str = "random",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
):
    """Raw pre-RoPE q, k, v whose channel D-1 encodes the requested decisions."""
    gen = torch.Generator().manual_seed(seed)
    q_BHTD = torch.randn(batch, heads, length, head_dim, generator=gen, dtype=dtype)
    k_BGTD = torch.randn(batch, groups, length, head_dim, generator=gen, dtype=dtype)
    v_BGTD = torch.randn(batch, groups, length, head_dim, generator=gen, dtype=dtype)
    merge_BGT = merge_pattern(pattern, batch, groups, length, gen)
    margin_BGT = 0.1 + torch.rand(batch, groups, length, generator=gen, dtype=dtype)
    k_BGTD[..., -1] = INIT_VALUE + torch.where(merge_BGT, margin_BGT, -margin_BGT)
    q_BHTD[..., -1] = 3.0 * torch.randn(batch, heads, length, generator=gen, dtype=dtype) - 4.0
    cos_TD, sin_TD = rope_cos_sin(torch.arange(length), head_dim, 10000.0, dtype)
    return q_BHTD, k_BGTD, v_BGTD, cos_TD, sin_TD, merge_BGT
