"""Windowed partial accumulation of keys and values, computed in parallel.

Legend: B batch, G KV heads, T time, D head dim, W window.

For every t (spec section 3):
    ktilde_t = sum_{s=t-W+1..t} P(s,t) w_s k_s / sum_s P(s,t) w_s,  P(s,t) = prod_{m=s+1..t} alpha_m
i.e. the recurrence z_t = alpha_t z_{t-1} + w_t truncated to the last W tokens. One pass per
offset o = 0..W-1 keeps memory at O(T*D) per offset instead of O(T^2).
"""

from __future__ import annotations

import torch

from megatron_dmc.ops._checks import check_rank, check_window


def _shift_right(x_BGT_: torch.Tensor, offset: int, time_dim: int) -> torch.Tensor:
    """x[t - offset] along time_dim, zeros where t < offset."""
    if offset == 0:
        return x_BGT_
    length = x_BGT_.shape[time_dim]
    if offset >= length:
        return torch.zeros_like(x_BGT_)
    kept = x_BGT_.narrow(time_dim, 0, length - offset)
    pad_shape = list(x_BGT_.shape)
    pad_shape[time_dim] = offset
    return torch.cat([x_BGT_.new_zeros(pad_shape), kept], dim=time_dim)


def windowed_partial_accumulation(
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    alpha_BGT: torch.Tensor,
    omega_BGT: torch.Tensor,
    window: int = 12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial accumulations (ktilde, vtilde) of pre-RoPE keys and values, [B, G, T, D]."""
    check_window(window)
    check_rank("k", k_BGTD, 4, "[batch, kv_heads, time, head_dim]")
    check_rank("alpha", alpha_BGT, 3, "[batch, kv_heads, time]")
    if alpha_BGT.shape != k_BGTD.shape[:3] or omega_BGT.shape != alpha_BGT.shape:
        raise ValueError(
            f"alpha {tuple(alpha_BGT.shape)} and omega {tuple(omega_BGT.shape)} must both be "
            f"[batch, kv_heads, time] = {tuple(k_BGTD.shape[:3])}"
        )
    head_dim = k_BGTD.shape[-1]
    kv_BGT2D = torch.cat([k_BGTD, v_BGTD], dim=-1)
    numerator_BGT2D = omega_BGT[..., None] * kv_BGT2D
    denominator_BGT = omega_BGT
    decay_BGT = torch.ones_like(alpha_BGT)
    for offset in range(1, min(window, k_BGTD.shape[2])):
        decay_BGT = decay_BGT * _shift_right(alpha_BGT, offset - 1, time_dim=2)
        weight_BGT = decay_BGT * _shift_right(omega_BGT, offset, time_dim=2)
        numerator_BGT2D = numerator_BGT2D + weight_BGT[..., None] * _shift_right(
            kv_BGT2D, offset, time_dim=2
        )
        denominator_BGT = denominator_BGT + weight_BGT
    kvtilde_BGT2D = numerator_BGT2D / denominator_BGT[..., None]
    return kvtilde_BGT2D[..., :head_dim], kvtilde_BGT2D[..., head_dim:]
