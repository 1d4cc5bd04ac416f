"""Hard decisions at inference: from the model (channel D-1 or decision heads), or forced
to a chosen rate.

Legend: B sequences, H query heads, G KV heads, T time, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_dmc.ops import (
    DecisionLogits,
    DMCConfig,
    eval_decisions,
    importance_from_logits,
    resolve_decision_logits,
)


@dataclass(frozen=True)
class ForcedRate:
    """Benchmark-only decisions: every head appends once per `cr` tokens, merging the rest.

    Gives compression ratio `cr` regardless of the weights, so that speed and memory can
    be measured at any CR with random weights. Outputs are NOT those of a trained model.
    KV head g is offset by g tokens so that heads do not all append on the same step.
    """

    cr: float

    def __post_init__(self) -> None:
        if not self.cr >= 1.0:
            raise ValueError(f"forced compression ratio must be >= 1.0; got {self.cr!r}")

    def merges(self, positions_BT: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """alpha [B, G, T]: 1 where token t merges into the previous slot."""
        offset_G1 = torch.arange(num_kv_heads, device=positions_BT.device)[:, None]
        shifted_BGT = positions_BT[:, None, :] + offset_G1
        slot_BGT = torch.floor(shifted_BGT / self.cr)
        prev_BGT = torch.floor((shifted_BGT - 1) / self.cr)
        return (slot_BGT == prev_BGT) & (positions_BT[:, None, :] > 0)


def layer_decisions(
    q_BHTD: torch.Tensor,
    k_BGTD: torch.Tensor,
    positions_BT: torch.Tensor,
    dmc: DMCConfig,
    forced: ForcedRate | None = None,
    logits: DecisionLogits | None = None,
    forced_alpha_BGT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha [B, G, T] bool, omega [B, G, T]); position 0 always appends.

    `logits` are the decision heads' (required in heads mode); channel mode reads q and k.
    `forced_alpha_BGT`: `forced`'s merges at these positions, when already computed.
    """
    num_groups = k_BGTD.shape[1]
    logits = resolve_decision_logits(q_BHTD, k_BGTD, dmc, logits)
    omega_BGT = importance_from_logits(logits.omega_BGT)
    if forced is not None and forced_alpha_BGT is not None:
        return forced_alpha_BGT, omega_BGT
    if forced is not None:
        return forced.merges(positions_BT, num_groups), omega_BGT
    alpha_BGT = eval_decisions(logits.alpha_BGT).bool()
    return alpha_BGT & (positions_BT[:, None, :] > 0), omega_BGT


def forced_rate_label(forced: ForcedRate | None) -> str:
    if forced is None:
        return "decisions from the model"
    cr = forced.cr
    shown = str(int(cr)) if math.isclose(cr, round(cr)) else f"{cr:g}"
    return f"FORCED-RATE decisions (CR {shown}, not the model's own)"
