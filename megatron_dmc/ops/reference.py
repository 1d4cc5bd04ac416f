"""Algorithm 1, one token at a time: the sequential reference for inference and tests.

Legend: B batch, H query heads, G KV heads, T time, D head dim.

Per (sequence, KV head): a list of cache slots and the state of the open slot, i.e. running
sums of w*k, w*v and w over the last `window` tokens of the current accumulation run (a ring
buffer of contributions, the oldest subtracted when the run outgrows the window). Slots keep
pre-RoPE merged keys and are rotated at the position of their newest token.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from megatron_dmc.ops._checks import check_qkv
from megatron_dmc.ops.config import DMCConfig
from megatron_dmc.ops.decisions import rope_without_decision_channel, zero_decision_channel


class _HeadCache:
    """The compressed cache of one (sequence, KV head)."""

    def __init__(self, window: int) -> None:
        self.keys_SD: list[torch.Tensor] = []
        self.values_SD: list[torch.Tensor] = []
        self.positions: list[int] = []
        self.window = window
        self.run: deque[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = deque()
        self.sum_wk = self.sum_wv = self.sum_w = None

    def append(self, k_D, v_D, w, position: int) -> None:
        self.run.clear()
        self.sum_wk, self.sum_wv, self.sum_w = w * k_D, w * v_D, w
        self.run.append((w * k_D, w * v_D, w))
        self.keys_SD.append(k_D)
        self.values_SD.append(v_D)
        self.positions.append(position)

    def accumulate(self, k_D, v_D, w, position: int) -> None:
        self.run.append((w * k_D, w * v_D, w))
        self.sum_wk, self.sum_wv, self.sum_w = (
            self.sum_wk + w * k_D,
            self.sum_wv + w * v_D,
            self.sum_w + w,
        )
        if len(self.run) > self.window:
            old_wk, old_wv, old_w = self.run.popleft()
            self.sum_wk, self.sum_wv, self.sum_w = (
                self.sum_wk - old_wk,
                self.sum_wv - old_wv,
                self.sum_w - old_w,
            )
        self.keys_SD[-1] = self.sum_wk / self.sum_w
        self.values_SD[-1] = self.sum_wv / self.sum_w
        self.positions[-1] = position


def _attend(q_D: torch.Tensor, cache: _HeadCache, cos_TD, sin_TD) -> torch.Tensor:
    positions_S = torch.tensor(cache.positions, device=q_D.device)
    keys_SD = torch.stack(cache.keys_SD)
    keys_SD = rope_without_decision_channel(keys_SD, cos_TD[positions_S], sin_TD[positions_S])
    scores_S = keys_SD @ q_D / math.sqrt(q_D.shape[-1])
    return torch.softmax(scores_S, dim=-1) @ torch.stack(cache.values_SD)


def dmc_sequential_reference(
    q_BHTD: torch.Tensor,
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    cos_TD: torch.Tensor,
    sin_TD: torch.Tensor,
    config: DMCConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode DMC attention token by token. Returns ([B, H, T, D], cache lengths [B, G])."""
    check_qkv(q_BHTD, k_BGTD, v_BGTD)
    batch, num_heads, length, _ = q_BHTD.shape
    num_groups = k_BGTD.shape[1]
    group = num_heads // num_groups
    out_BHTD = torch.zeros_like(q_BHTD[..., : v_BGTD.shape[-1]])
    lengths_BG = torch.zeros(batch, num_groups, dtype=torch.long)
    for b in range(batch):
        for g in range(num_groups):
            cache = _HeadCache(config.window)
            heads = range(g * group, (g + 1) * group)
            for t in range(length):
                _step(cache, q_BHTD[b, heads, t], k_BGTD[b, g, t], v_BGTD[b, g, t], t, config)
                for h in heads:
                    q_rot_D = rope_without_decision_channel(q_BHTD[b, h, t], cos_TD[t], sin_TD[t])
                    out_BHTD[b, h, t] = _attend(q_rot_D, cache, cos_TD, sin_TD)
            lengths_BG[b, g] = len(cache.keys_SD)
    return out_BHTD, lengths_BG


def _step(cache: _HeadCache, q_ND, k_D, v_D, t: int, config: DMCConfig) -> None:
    merge = t > 0 and bool(k_D[-1] - config.init_value > 0)
    w = torch.sigmoid(q_ND[:, -1].mean() + config.init_value) + torch.finfo(q_ND.dtype).eps
    if merge:
        cache.accumulate(zero_decision_channel(k_D), v_D, w, t)
    else:
        cache.append(zero_decision_channel(k_D), v_D, w, t)
