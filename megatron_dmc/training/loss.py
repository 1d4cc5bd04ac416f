"""The training loss of one micro-batch: LM cross-entropy (masked mean), distillation KL
(masked mean, when a teacher is given) and the CR loss, each with its weight.

Legend: b micro-batch size, s sequence length.

The model's last pipeline stage returns the per-token cross-entropy and, per sequence,
the sum of STE-hard decisions over all layers and KV heads (summed over the pipeline
stages by the model, over the tensor-parallel ranks here). `count` is the number of
decisions per sequence: layers x KV heads x s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from megatron_dmc.ops import compression_loss

STATS = ("lm_loss_sum", "tokens", "cr_loss_sum", "sequences", "alpha_sum", "kl_sum")
"""Fields of the per-micro-batch statistics vector the loss function returns."""


@dataclass(frozen=True)
class LossSettings:
    target_cr: float | None
    """CR the loss asks for at this step; None: no CR loss (zero_out, vanilla)."""

    decisions_per_sequence: int
    """layers x KV heads x sequence length, over the whole model."""

    cr_loss_weight: float = 1.0
    """Weight of the CR loss in the total loss (1 in the release)."""

    lm_loss_weight: float = 1.0
    """Weight of the LM cross-entropy in the total loss (1 in the release)."""

    distill_weight: float = 0.0
    """Weight of the KL to the teacher; 0: no teacher (the release)."""

    cr_overshoot: float | None = None
    """The CR loss also charges compressing more than target x (1 + this)
    (--dmc-cr-overshoot); None: one-sided, the paper."""


def global_alpha_sum(alpha_sum_B: torch.Tensor, summed_over_tp: bool) -> torch.Tensor:
    """Decision sums over all KV heads: all-reduce the TP-local sums (identity backward,
    so each rank's gradient reaches its own heads)."""
    if summed_over_tp or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return alpha_sum_B
    return reduce_from_tensor_model_parallel_region(alpha_sum_B)


def micro_batch_loss(
    loss_BS: torch.Tensor,
    loss_mask_BS: torch.Tensor,
    alpha_sum_B: torch.Tensor | None,
    settings: LossSettings,
    kl_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, statistics vector ordered as STATS). `kl_BS`: per-token
    KL(student || teacher) when distilling."""
    mask_BS = loss_mask_BS.to(loss_BS.dtype)
    tokens = mask_BS.sum()
    lm_sum = (loss_BS * mask_BS).sum()
    loss = lm_sum / tokens.clamp(min=1)
    if settings.lm_loss_weight != 1.0:
        loss = settings.lm_loss_weight * loss
    kl_sum = loss.new_zeros(())
    if kl_BS is not None:
        kl_sum = (kl_BS * mask_BS).sum()
        loss = loss + settings.distill_weight * kl_sum / tokens.clamp(min=1)
    cr_loss = loss.new_zeros(())
    alpha_total = loss.new_zeros(())
    if alpha_sum_B is not None:
        alpha_total = alpha_sum_B.detach().sum()
        if settings.target_cr is not None:
            count = settings.decisions_per_sequence
            cr_loss = compression_loss(
                alpha_sum_B, count, settings.target_cr, settings.cr_overshoot
            )
            loss = loss + settings.cr_loss_weight * cr_loss
    sequences = loss.new_tensor(float(loss_BS.shape[0]))
    stats = torch.stack(
        [
            lm_sum.detach(),
            tokens,
            cr_loss.detach() * sequences,
            sequences,
            alpha_total,
            kl_sum.detach(),
        ]
    )
    return loss, stats
