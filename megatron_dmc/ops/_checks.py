"""Argument validation shared by the ops: clear ValueErrors, raised before any work."""

from __future__ import annotations

import torch


def check_rank(name: str, tensor: torch.Tensor, rank: int, layout: str) -> None:
    if tensor.dim() != rank:
        raise ValueError(
            f"{name} must have {rank} dims laid out as {layout}; got shape {tuple(tensor.shape)}"
        )


def check_window(window: int) -> None:
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (the release uses 12); got {window!r}")


def check_head_dim(head_dim: int) -> None:
    if head_dim < 2:
        raise ValueError(
            f"head dim must be >= 2: DMC repurposes the last channel; got head_dim={head_dim}"
        )


def check_groups(num_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads}); "
            "each KV head is shared by an equal group of query heads"
        )


def check_compression_ratio(name: str, value: float) -> None:
    if not value >= 1.0:
        raise ValueError(f"{name} must be >= 1.0 (1.0 = no compression); got {value!r}")


def check_qkv(q_BHTD: torch.Tensor, k_BGTD: torch.Tensor, v_BGTD: torch.Tensor) -> None:
    check_rank("q", q_BHTD, 4, "[batch, heads, time, head_dim]")
    check_rank("k", k_BGTD, 4, "[batch, kv_heads, time, head_dim]")
    check_rank("v", v_BGTD, 4, "[batch, kv_heads, time, head_dim]")
    b, h, t, d = q_BHTD.shape
    if k_BGTD.shape[0] != b or k_BGTD.shape[2] != t or k_BGTD.shape[3] != d:
        raise ValueError(
            f"k shape {tuple(k_BGTD.shape)} does not match q shape {tuple(q_BHTD.shape)} "
            "in batch, time or head_dim"
        )
    if v_BGTD.shape[:3] != k_BGTD.shape[:3]:
        raise ValueError(
            f"v shape {tuple(v_BGTD.shape)} does not match k shape {tuple(k_BGTD.shape)} "
            "in batch, kv_heads or time"
        )
    check_head_dim(d)
    check_groups(h, k_BGTD.shape[1])
