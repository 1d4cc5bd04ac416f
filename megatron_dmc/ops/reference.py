"""Algorithm 1, one token at a time: the sequential reference for inference and tests.

Legend: B batch, H query heads, G KV heads, T time, D head dim.

Per (sequence, KV head): a list of cache slots and the state of the open slot, i.e. running
sums of w*k, w*v and w over the last `window` tokens of the current accumulation run (a ring
buffer of contributions, the oldest subtracted when the run outgrows the window). Slots keep
pre-RoPE merged keys and are rotated at the position of their newest token.

Delayed merging (merge delay W): each (sequence, KV head) also keeps a ring of its W most
recent tokens, exact. Token t enters the ring; the token that leaves it (t - W) is only
then put through Algorithm 1 with its own (alpha, omega). Query t attends the compressed
slots and the ring.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from megatron_dmc.ops._checks import check_qkv
from megatron_dmc.ops.config import DMCConfig
from megatron_dmc.ops.forward import (
    key_for_accumulation,
    resolve_decision_logits,
    rope_for_attention,
)
from megatron_dmc.ops.heads import DecisionLogits, importance_from_logits


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


def _attend(q_D: torch.Tensor, cache: _HeadCache, ring: deque, rope) -> torch.Tensor:
    keys_SD = [rope(k_D, p) for k_D, p in zip(cache.keys_SD, cache.positions)]
    keys_SD += [rope(k_D, p) for k_D, _, p, _, _ in ring]
    values_SD = cache.values_SD + [v_D for _, v_D, _, _, _ in ring]
    scores_S = torch.stack(keys_SD) @ q_D / math.sqrt(q_D.shape[-1])
    return torch.softmax(scores_S, dim=-1) @ torch.stack(values_SD)


def dmc_sequential_reference(
    q_BHTD: torch.Tensor,
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    cos_TD: torch.Tensor,
    sin_TD: torch.Tensor,
    config: DMCConfig,
    logits: DecisionLogits | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode DMC attention token by token. Returns ([B, H, T, D], cache lengths [B, G]).

    Cache length = compressed slots + exact ring entries. `logits` as for `make_decisions`
    (required in heads mode); token t reads only its own column.
    """
    check_qkv(q_BHTD, k_BGTD, v_BGTD)
    logits = resolve_decision_logits(q_BHTD, k_BGTD, config, logits)
    batch, num_heads, length, _ = q_BHTD.shape
    num_groups = k_BGTD.shape[1]
    group = num_heads // num_groups
    out_BHTD = torch.zeros_like(q_BHTD[..., : v_BGTD.shape[-1]])
    lengths_BG = torch.zeros(batch, num_groups, dtype=torch.long)

    def rope(x_D, position):
        return rope_for_attention(x_D, cos_TD[position], sin_TD[position], config)

    for b in range(batch):
        for g in range(num_groups):
            cache, ring = _HeadCache(config.window_size), deque()
            for t in range(length):
                merge = t > 0 and bool(logits.alpha_BGT[b, g, t] > 0)
                w = importance_from_logits(logits.omega_BGT[b, g, t])
                k_D = key_for_accumulation(k_BGTD[b, g, t], config)
                ring.append((k_D, v_BGTD[b, g, t], t, merge, w))
                if len(ring) > config.merge_delay:
                    k_old, v_old, p_old, merge_old, w_old = ring.popleft()
                    step = cache.accumulate if merge_old else cache.append
                    step(k_old, v_old, w_old, p_old)
                for h in range(g * group, (g + 1) * group):
                    out_BHTD[b, h, t] = _attend(rope(q_BHTD[b, h, t], t), cache, ring, rope)
            lengths_BG[b, g] = len(cache.keys_SD) + len(ring)
    return out_BHTD, lengths_BG
