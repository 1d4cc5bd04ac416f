"""Gumbel-sigmoid relaxation and hard (straight-through) decisions."""

from __future__ import annotations

import torch


def gumbel_sigmoid(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """sigmoid((l + g1 - g2) / tau) with g1, g2 ~ Gumbel(0, 1).

    g1 - g2 of two independent Gumbel(0, 1) variables is Logistic(0, 1), sampled here
    as log(u) - log(1 - u) from one uniform draw.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (the paper uses 0.1); got {temperature!r}")
    tiny = torch.finfo(logits.dtype).tiny
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    u = u.clamp(tiny, 1.0 - torch.finfo(logits.dtype).eps)
    noise = torch.log(u) - torch.log1p(-u)
    return torch.sigmoid((logits + noise) / temperature)


def hard_decisions(alpha: torch.Tensor) -> torch.Tensor:
    """1[alpha > 0.5] in alpha's dtype (no gradient)."""
    return (alpha > 0.5).to(alpha.dtype)


def straight_through(alpha: torch.Tensor) -> torch.Tensor:
    """Forward: the hard decision 1[alpha > 0.5]. Backward: the gradient of alpha itself."""
    return hard_decisions(alpha) + (alpha - alpha.detach())


def eval_decisions(logits: torch.Tensor) -> torch.Tensor:
    """Eval mode: no noise, hard threshold (sigmoid(l) > 0.5 <=> l > 0)."""
    return (logits > 0).to(logits.dtype)
