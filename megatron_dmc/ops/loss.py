"""Compression loss and the schedules of a retrofit (spec sections 4 and 5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dmc.ops._checks import check_compression_ratio


def compression_loss(
    alpha_sum_B: torch.Tensor,
    count: int | float | torch.Tensor,
    target_cr: float,
    overshoot: float | None = None,
) -> torch.Tensor:
    """L_CR = mean_b max(0, (1 - 1/CR_target) - a_b), a_b = alpha_sum_b / count.

    alpha_sum_B holds, per sequence, the sum of STE-hard decisions over all layers, heads
    and tokens; count is the number of decisions per sequence. One-sided (the paper): a
    sequence that over-compresses adds nothing, and it cannot pay for another sequence's
    deficit. `overshoot` (e.g. 0.05): a sequence compressing more than CR_target * (1 +
    overshoot) pays max(0, a_b - (1 - 1/(CR_target (1 + overshoot)))) too; inside that
    band the CR loss is zero, so the other losses alone shape the decisions.
    """
    check_compression_ratio("target_cr", target_cr)
    if alpha_sum_B.dim() != 1:
        raise ValueError(f"alpha_sum_B must be [batch]; got shape {tuple(alpha_sum_B.shape)}")
    fraction_B = alpha_sum_B / count
    loss_B = torch.relu((1.0 - 1.0 / target_cr) - fraction_B)
    if overshoot is not None:
        if overshoot < 0:
            raise ValueError(f"overshoot must be >= 0 (a fraction of the target); got {overshoot}")
        ceiling = 1.0 - 1.0 / (target_cr * (1.0 + overshoot))
        loss_B = loss_B + torch.relu(fraction_B - ceiling)
    return loss_B.mean()


def training_length_cr(
    target_cr: float, seq_length: int, merge_delay: int, reference_length: int | None
) -> float:
    """The CR a `seq_length`-token sequence must reach so that a `reference_length`-token
    one, merging the tokens that left the W-token exact window at the same rate, reaches
    `target_cr`.

    With W exact tokens, L tokens keep W + (L - W)(1 - p) slots at merge rate p, so the
    rate of CR* at L is 1 - p = (L / CR* - W) / (L - W). Without a delay, or at L =
    seq_length, this is CR* itself (the paper's accounting).
    """
    check_compression_ratio("target_cr", target_cr)
    length = seq_length if reference_length is None else reference_length
    if merge_delay == 0 or length == seq_length or target_cr == 1.0:
        return target_cr
    if length / target_cr <= merge_delay:
        raise ValueError(
            f"a merge delay of {merge_delay} keeps {merge_delay} exact tokens, so "
            f"{length} tokens cannot reach {target_cr:g}x (at most {length / (merge_delay + 1):.3g}x)"
        )
    keep_rate = (length / target_cr - merge_delay) / (length - merge_delay)
    exact = min(merge_delay, seq_length)
    return seq_length / (exact + (seq_length - exact) * keep_rate)


def achieved_compression_ratio(alpha_mean: float | torch.Tensor) -> float:
    """CR = tokens seen / slots kept = 1 / (1 - mean alpha)."""
    alpha_mean = float(alpha_mean)
    return float("inf") if alpha_mean >= 1.0 else 1.0 / (1.0 - alpha_mean)


@dataclass(frozen=True)
class CRSchedule:
    """CR_target(step) = 1 + (CR* - 1) * min(1, step / ramp_iters): linear in CR."""

    target_cr: float
    ramp_iters: int

    def __post_init__(self) -> None:
        check_compression_ratio("target_cr", self.target_cr)
        if self.ramp_iters < 0:
            raise ValueError(f"ramp_iters must be >= 0; got {self.ramp_iters}")

    def __call__(self, step: int) -> float:
        progress = 1.0 if self.ramp_iters == 0 else min(1.0, max(step, 0) / self.ramp_iters)
        return 1.0 + (self.target_cr - 1.0) * progress


@dataclass(frozen=True)
class ZeroOutSchedule:
    """Stage 1: channel D-1 of q and k is scaled by lambda = max(0, 1 - step / anneal_iters)."""

    anneal_iters: int = 200

    def __post_init__(self) -> None:
        if self.anneal_iters < 1:
            raise ValueError(f"anneal_iters must be >= 1; got {self.anneal_iters}")

    def __call__(self, step: int) -> float:
        return max(0.0, 1.0 - step / self.anneal_iters)
