"""RoPE of decode queries through tables built once per step, shared by every layer.

Legend: B sequences, H query heads, D head dim.

`ops.apply_rope` is x*cos + rotate_half(x)*sin with rotate_half a cat of a negated and a
plain half: seven small ops per layer call. Here the half rotation is a roll by D/2 whose
sign is folded into the sine table, so x*cos + roll(x)*sin_signed takes the same products in
four ops. DMC channel mode's `ops.rope_without_decision_channel` (channel D-1 zeroed, rotate,
zeroed again) is the same formula with cos[D-1], sin[D-1] and sin[D/2-1] zeroed in the
tables: channel D-1 then reaches no output. Equal to the ops' functions up to the sign of a
zero (tests/inference/test_query_rope.py; an addcmul would fuse the multiply-add and round
differently).
"""

from __future__ import annotations

import torch


def query_tables(
    cos_BD: torch.Tensor, sin_BD: torch.Tensor, without_decision_channel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos [B, 1, D], signed sin [B, 1, D]) for `rotate_query`."""
    half = cos_BD.shape[-1] // 2
    sign_D = torch.ones(cos_BD.shape[-1], dtype=sin_BD.dtype, device=sin_BD.device)
    sign_D[:half] = -1
    cos_BD, sin_BD = cos_BD.clone(), sin_BD * sign_D
    if without_decision_channel:
        cos_BD[:, -1] = 0
        sin_BD[:, -1] = 0
        sin_BD[:, half - 1] = 0
    return cos_BD[:, None], sin_BD[:, None]


def rotate_query(q_BHD: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The rotated queries [B, H, D]."""
    cos_B1D, sin_B1D = tables
    return q_BHD * cos_B1D + q_BHD.roll(q_BHD.shape[-1] // 2, -1) * sin_B1D
