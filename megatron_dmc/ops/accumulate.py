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


class _WindowedAccumulation(torch.autograd.Function):
    """kvtilde[t] = sum_o w_o[t] kv[t-o] / sum_o w_o[t] for o < n, with the weights w_o of
    `_offset_weights`, and a hand-written backward. Every shifted tensor is a view of one
    padded copy (no copy per offset, none saved); the forward does the reference's
    arithmetic in the reference's order; the backward takes each offset's gradient as one
    product-sum and one in-place multiply-add, and the weights' through the decay chain."""

    @staticmethod
    def forward(ctx, kv_BGTF, alpha_BGT, omega_BGT, count):
        last = count - 1
        kv_pad_BGPF = _pad_front(kv_BGTF, last)
        alpha_pad_BGP, omega_pad_BGP = (_pad_front(x[..., None], last)[..., 0]
                                        for x in (alpha_BGT, omega_BGT))  # fmt: skip
        weights, decays = [omega_BGT], [torch.ones_like(alpha_BGT)]
        for offset in range(1, count):
            decays.append(decays[-1] * _shifted(alpha_pad_BGP, offset - 1, last))
            weights.append(decays[-1] * _shifted(omega_pad_BGP, offset, last))
        numerator_BGTF = weights[0][..., None] * kv_BGTF
        denominator_BGT = weights[0]
        for offset, weight_BGT in enumerate(weights[1:], start=1):
            shifted_BGTF = _shifted(kv_pad_BGPF, offset, last)
            numerator_BGTF = numerator_BGTF.add_(weight_BGT[..., None] * shifted_BGTF)
            denominator_BGT = denominator_BGT + weight_BGT
        kvtilde_BGTF = numerator_BGTF / denominator_BGT[..., None]
        ctx.count = count
        ctx.save_for_backward(kv_pad_BGPF, alpha_pad_BGP, omega_pad_BGP, denominator_BGT,
                              kvtilde_BGTF, *weights, *decays)  # fmt: skip
        ctx.dtypes = (kv_BGTF.dtype, alpha_BGT.dtype, omega_BGT.dtype)
        return kvtilde_BGTF

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_BGTF):
        kv_pad_BGPF, alpha_pad_BGP, omega_pad_BGP, denominator_BGT, kvtilde_BGTF, *rest = (
            ctx.saved_tensors
        )
        count, last = ctx.count, ctx.count - 1
        weights, decays = rest[:count], rest[count:]
        grad_num_BGTF = grad_BGTF / denominator_BGT[..., None]
        grad_den_BGT = -(grad_num_BGTF * kvtilde_BGTF).sum(-1)
        grad_kv_pad_BGPF = torch.zeros_like(kv_pad_BGPF)
        grad_omega_pad_BGP = torch.zeros_like(omega_pad_BGP)
        grad_alpha_pad_BGP = torch.zeros_like(alpha_pad_BGP)
        grad_decay_BGT = None  # d loss / d decay_{o+1}, carried down the chain
        for offset in range(last, -1, -1):
            weight_BGT = weights[offset]
            _shifted(grad_kv_pad_BGPF, offset, last).add_(weight_BGT[..., None] * grad_num_BGTF)
            shifted_BGTF = _shifted(kv_pad_BGPF, offset, last)
            grad_w_BGT = (grad_num_BGTF * shifted_BGTF).sum(-1) + grad_den_BGT
            _shifted(grad_omega_pad_BGP, offset, last).add_(grad_w_BGT * decays[offset])
            if offset == 0:
                break
            # decay_o = decay_{o-1} * alpha[t-o+1]; w_o = decay_o * omega[t-o]
            grad_here_BGT = grad_w_BGT * _shifted(omega_pad_BGP, offset, last)
            if grad_decay_BGT is not None:
                grad_here_BGT = grad_here_BGT + grad_decay_BGT * _shifted(
                    alpha_pad_BGP, offset, last
                )
            _shifted(grad_alpha_pad_BGP, offset - 1, last).add_(grad_here_BGT * decays[offset - 1])
            grad_decay_BGT = grad_here_BGT
        kv_dtype, alpha_dtype, omega_dtype = ctx.dtypes
        grad_alpha_BGT = grad_alpha_pad_BGP[:, :, last:].to(alpha_dtype) if count > 1 else None
        return (grad_kv_pad_BGPF[:, :, last:].to(kv_dtype), grad_alpha_BGT,
                grad_omega_pad_BGP[:, :, last:].to(omega_dtype), None)  # fmt: skip


def _pad_front(x_BGTF: torch.Tensor, count: int) -> torch.Tensor:
    """x with `count` zero steps in front: [B, G, count + T, F]."""
    if count == 0:
        return x_BGTF
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

    Through `_WindowedAccumulation`: the forward arithmetic of
    `windowed_partial_accumulation_reference` in the same order, gradients equal up to
    rounding."""
    _check_accumulation_inputs(k_BGTD, alpha_BGT, omega_BGT, window)
    head_dim = k_BGTD.shape[-1]
    kv_BGT2D = torch.cat([k_BGTD, v_BGTD], dim=-1)
    count = min(window, k_BGTD.shape[2])
    kvtilde_BGT2D = _WindowedAccumulation.apply(kv_BGT2D, alpha_BGT, omega_BGT, count)
    return kvtilde_BGT2D[..., :head_dim], kvtilde_BGT2D[..., head_dim:]
