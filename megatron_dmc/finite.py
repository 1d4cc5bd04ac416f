"""Refuse weights with NaN or inf: one check shared by export, generation, bench and eval."""

from __future__ import annotations

from collections.abc import Iterable

import torch

RECOVERY = "docs/training.md, 'When things go wrong'"


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int, int] | None:
    """(name, non-finite count, size) of the first floating tensor holding NaN or inf."""
    for name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            return name, bad, tensor.numel()
    return None


def check_finite_weights(named: Iterable[tuple[str, torch.Tensor]], source: object) -> None:
    """Raise ValueError naming the first tensor of `named` (from `source`) with NaN/inf."""
    found = first_non_finite(named)
    if found is None:
        return
    name, bad, size = found
    raise ValueError(
        f"{source}: tensor {name} has {bad} non-finite values (NaN/inf) of {size}: the weights "
        f"are damaged; use an earlier checkpoint (see {RECOVERY})"
    )
