"""Rotate-half rotary position embedding (the HF Llama / Megatron-Core default layout).

Legend: B batch, H heads, T time, D head dim.
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    positions_T: torch.Tensor, head_dim: int, theta: float = 10000.0, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [..., T, D] for integer positions (any leading dims)."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions_T.device) / head_dim)
    )
    angles = positions_T.to(torch.float64)[..., None] * inv_freq
    angles_TD = torch.cat([angles, angles], dim=-1)
    return angles_TD.cos().to(dtype), angles_TD.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x_BHTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """x*cos + rotate_half(x)*sin; cos/sin broadcast against x (e.g. [T,D] or [B,1,T,D])."""
    return x_BHTD * cos_TD + rotate_half(x_BHTD) * sin_TD
