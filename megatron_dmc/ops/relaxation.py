"""Gumbel-sigmoid relaxation and hard (straight-through) decisions."""

from __future__ import annotations

import torch


def logistic_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """g1 - g2 of two independent Gumbel(0, 1) variables, i.e. Logistic(0, 1), from U(0, 1)."""
    finfo = torch.finfo(u.dtype)
    u = u.clamp(finfo.tiny, 1.0 - finfo.eps)
    return torch.log(u) - torch.log1p(-u)


def gumbel_sigmoid(
    logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """sigmoid((l + g1 - g2) / tau) with g1, g2 ~ Gumbel(0, 1).

    The noise g1 - g2 is drawn from one uniform per element (`logistic_from_uniform`)
    unless given: callers that must draw the same noise under any tensor-parallel split
    pass their own.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (the paper uses 0.1); got {temperature!r}")
    if noise is None:
        uniform = torch.rand(
            logits.shape, generator=generator, dtype=logits.dtype, device=logits.device
        )
        noise = logistic_from_uniform(uniform)
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
