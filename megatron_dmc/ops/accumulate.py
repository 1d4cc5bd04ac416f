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


def _check_accumulation_inputs(k_BGTD, alpha_BGT, omega_BGT, window: int) -> None:
    check_window(window)
    check_rank("k", k_BGTD, 4, "[batch, kv_heads, time, head_dim]")
    check_rank("alpha", alpha_BGT, 3, "[batch, kv_heads, time]")
    if alpha_BGT.shape != k_BGTD.shape[:3] or omega_BGT.shape != alpha_BGT.shape:
        raise ValueError(
            f"alpha {tuple(alpha_BGT.shape)} and omega {tuple(omega_BGT.shape)} must both be "
            f"[batch, kv_heads, time] = {tuple(k_BGTD.shape[:3])}"
        )


def _offset_weights(alpha_BGT: torch.Tensor, omega_BGT: torch.Tensor, window: int) -> list:
    """[w_0, .., w_{n-1}], n = min(W, T): w_o[t] = prod_{m=t-o+1..t} alpha_m * omega_{t-o}
    (zero where t < o), the weight of token t - o in the slot of token t."""
    weights = [omega_BGT]
    decay_BGT = torch.ones_like(alpha_BGT)
    for offset in range(1, min(window, alpha_BGT.shape[2])):
        decay_BGT = decay_BGT * _shift_right(alpha_BGT, offset - 1, time_dim=2)
        weights.append(decay_BGT * _shift_right(omega_BGT, offset, time_dim=2))
    return weights


def windowed_partial_accumulation_reference(
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    alpha_BGT: torch.Tensor,
    omega_BGT: torch.Tensor,
    window: int = 12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`windowed_partial_accumulation` through plain autograd: a shifted copy of the keys
    and values per offset (the parity reference)."""
    _check_accumulation_inputs(k_BGTD, alpha_BGT, omega_BGT, window)
    head_dim = k_BGTD.shape[-1]
    kv_BGT2D = torch.cat([k_BGTD, v_BGTD], dim=-1)
    weights = _offset_weights(alpha_BGT, omega_BGT, window)
    numerator_BGT2D = weights[0][..., None] * kv_BGT2D
    denominator_BGT = weights[0]
    for offset, weight_BGT in enumerate(weights[1:], start=1):
        numerator_BGT2D = numerator_BGT2D + weight_BGT[..., None] * _shift_right(
            kv_BGT2D, offset, time_dim=2
        )
        denominator_BGT = denominator_BGT + weight_BGT
    kvtilde_BGT2D = numerator_BGT2D / denominator_BGT[..., None]
    return kvtilde_BGT2D[..., :head_dim], kvtilde_BGT2D[..., head_dim:]


class _WeightedWindow(torch.autograd.Function):
    """kvtilde[t] = sum_o w_o[t] kv[t-o] / sum_o w_o[t] with a hand-written backward: the
    shifted keys and values are views of one padded copy (no copy per offset, none saved),
    and each offset's gradient is one product-sum and one in-place multiply-add."""

    @staticmethod
    def forward(ctx, kv_BGTF, *weights):
        dtype = torch.promote_types(kv_BGTF.dtype, weights[0].dtype)
        kv_pad_BGPF = _pad_front(kv_BGTF.to(dtype), len(weights) - 1)
        numerator_BGTF = weights[0][..., None] * kv_BGTF
        denominator_BGT = weights[0]
        for offset, weight_BGT in enumerate(weights[1:], start=1):
            shifted_BGTF = _shifted(kv_pad_BGPF, offset, len(weights) - 1)
            numerator_BGTF = numerator_BGTF.add_(weight_BGT[..., None] * shifted_BGTF)
            denominator_BGT = denominator_BGT + weight_BGT
        kvtilde_BGTF = numerator_BGTF / denominator_BGT[..., None]
        ctx.save_for_backward(kv_pad_BGPF, denominator_BGT, kvtilde_BGTF, *weights)
        ctx.kv_dtype = kv_BGTF.dtype
        return kvtilde_BGTF

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_BGTF):
        kv_pad_BGPF, denominator_BGT, kvtilde_BGTF, *weights = ctx.saved_tensors
        last = len(weights) - 1
        grad_num_BGTF = grad_BGTF / denominator_BGT[..., None]
        grad_den_BGT = -(grad_num_BGTF * kvtilde_BGTF).sum(-1)
        grad_kv_pad_BGPF = torch.zeros_like(kv_pad_BGPF)
        grad_weights = []
        for offset, weight_BGT in enumerate(weights):
            shifted_BGTF = _shifted(kv_pad_BGPF, offset, last)
            _shifted(grad_kv_pad_BGPF, offset, last).add_(weight_BGT[..., None] * grad_num_BGTF)
            grad_w_BGT = (grad_num_BGTF * shifted_BGTF).sum(-1) + grad_den_BGT
            grad_weights.append(grad_w_BGT.to(weight_BGT.dtype))
        grad_kv_BGTF = grad_kv_pad_BGPF[:, :, last:].to(ctx.kv_dtype)
        return (grad_kv_BGTF, *grad_weights)


def _pad_front(x_BGTF: torch.Tensor, count: int) -> torch.Tensor:
    """x with `count` zero steps in front: [B, G, count + T, F]."""
    return torch.cat([x_BGTF.new_zeros(*x_BGTF.shape[:2], count, x_BGTF.shape[3]), x_BGTF], 2)


def _shifted(x_pad_BGPF: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """The view x[t - offset] (zeros where t < offset) of a tensor padded by `count`."""
    length = x_pad_BGPF.shape[2] - count
    return x_pad_BGPF.narrow(2, count - offset, length)


def windowed_partial_accumulation(
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    alpha_BGT: torch.Tensor,
    omega_BGT: torch.Tensor,
    window: int = 12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial accumulations (ktilde, vtilde) of pre-RoPE keys and values, [B, G, T, D].

    The offsets' weights go through autograd ([B, G, T] each); the weighted sums of the
    keys and values through `_WeightedWindow`. Same forward arithmetic, in the same order,
    as `windowed_partial_accumulation_reference`; gradients equal up to rounding."""
    _check_accumulation_inputs(k_BGTD, alpha_BGT, omega_BGT, window)
    head_dim = k_BGTD.shape[-1]
    kv_BGT2D = torch.cat([k_BGTD, v_BGTD], dim=-1)
    weights = _offset_weights(alpha_BGT, omega_BGT, window)
    kvtilde_BGT2D = _WeightedWindow.apply(kv_BGT2D, *weights)
    return kvtilde_BGT2D[..., :head_dim], kvtilde_BGT2D[..., head_dim:]
