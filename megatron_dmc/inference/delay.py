"""One decode step of one attention layer in every mode: vanilla, DMC (channel, decision
heads, DMS's query neuron), with or without a merge delay.

Legend: B sequences, H query heads, G KV heads, N query heads per KV head, S paged slots,
W merge delay, D head dim.

Per layer: the decisions (a forced rate's once per step), the query's RoPE (tables once per
step, query_rope.py), Algorithm 1 on the cache (`PagedKVCache.append`), then paged
attention through a backend of decode.py. With a merge delay W the new token enters the exact ring, the token it displaces
(position p - W) goes through Algorithm 1 on the paged slots, and the backend attends the
paged slots in place plus the ring as one more block per stream (one online softmax): a
`RingBlock` hands it the ring's layer slab, the rows of the batch and the RoPE tables of
the ring's positions; the compiled kernel rotates each ring key on the fly, the torch and
Triton backends rotate a copy of the batch's rings. The pages are never copied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from megatron_dmc.inference.attention import RingBlock
from megatron_dmc.inference.decisions import ForcedRate, layer_decisions
from megatron_dmc.inference.decode import WITHOUT_RING, get_backend
from megatron_dmc.inference.kv_cache import PagedKVCache
from megatron_dmc.inference.query_rope import query_tables, rotate_query
from megatron_dmc.ops import DecisionLogits, DMCConfig, rope_for_query

RopeTables = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class DecodeStep:
    """What one decode step shares across layers: positions and RoPE tables."""

    positions_B: torch.Tensor
    cos_BD: torch.Tensor
    sin_BD: torch.Tensor
    rope: RopeTables
    """positions [N] -> (cos [N, D], sin [N, D]) of the model."""
    dmc: DMCConfig | None
    forced: ForcedRate | None = None
    _tables: dict = field(default_factory=dict)

    def attend(
        self,
        q_BHD: torch.Tensor,
        k_BGD: torch.Tensor,
        v_BGD: torch.Tensor,
        logits: DecisionLogits | None,
        cache: PagedKVCache,
        layer: int,
        seq_ids_B: torch.Tensor,
        backend: str,
    ) -> torch.Tensor:
        """Raw pre-RoPE q, k, v of one new token per sequence -> attention output [B, H, D]."""
        dmc = self.dmc
        cache.check_compatible(dmc)
        with record_function("decode.decisions"):
            alpha_BG, omega_BG = self._decisions(q_BHD, k_BGD, logits)
            q_rot_BHD = self._rotate_query(q_BHD, k_BGD.shape[1])
        if dmc is None or not dmc.merge_delay:
            with record_function("decode.cache_write"):
                cache.append(
                    layer, seq_ids_B, k_BGD, v_BGD, alpha_BG, omega_BG, self.cos_BD, self.sin_BD
                )
            with record_function("decode.attention"):
                return get_backend(backend)(q_rot_BHD, cache, layer, seq_ids_B)
        cos_old_BD, sin_old_BD = self._table("leaving")
        with record_function("decode.cache_write"):
            cache.append_delayed(
                layer, seq_ids_B, k_BGD, v_BGD, alpha_BG, omega_BG, cos_old_BD, sin_old_BD
            )
        with record_function("decode.attention"):
            ring = self._ring_block(cache, layer, seq_ids_B)
            name = "padded" if backend in WITHOUT_RING else backend
            return get_backend(name)(q_rot_BHD, cache, layer, seq_ids_B, ring=ring)

    def _decisions(self, q_BHD, k_BGD, logits) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha [B, G] bool, omega [B, G]); vanilla: all appends, weight 1. A forced
        rate's decisions depend only on the positions: computed once per step."""
        groups = k_BGD.shape[1]
        if self.dmc is None:
            key = ("vanilla", groups, k_BGD.dtype)
            if key not in self._tables:
                shape, device = k_BGD.shape[:2], k_BGD.device
                self._tables[key] = (torch.zeros(shape, dtype=torch.bool, device=device),
                                     torch.ones(shape, dtype=k_BGD.dtype, device=device))  # fmt: skip
            return self._tables[key]
        alpha_BGT = None
        if self.forced is not None:
            key = ("forced", groups)
            if key not in self._tables:
                self._tables[key] = self.forced.merges(self.positions_B[:, None], groups)
            alpha_BGT = self._tables[key]
        alpha_BGT, omega_BGT = layer_decisions(
            q_BHD[:, :, None], k_BGD[:, :, None], self.positions_B[:, None], self.dmc,
            self.forced, logits, alpha_BGT,
        )  # fmt: skip
        return alpha_BGT[..., 0], omega_BGT[..., 0]

    def _rotate_query(self, q_BHD: torch.Tensor, groups: int) -> torch.Tensor:
        """RoPE of the queries as the mode stores keys (query_rope.py: tables once per step)."""
        dmc = self.dmc
        if dmc is not None and dmc.uses_query:
            return rope_for_query(q_BHD, self.cos_BD[:, None], self.sin_BD[:, None], dmc, groups)
        if "query" not in self._tables:
            channel = dmc is not None and dmc.uses_channel
            self._tables["query"] = query_tables(self.cos_BD, self.sin_BD, channel)
        return rotate_query(q_BHD, self._tables["query"])

    def _table(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE of the leaving tokens [B, D] or of the ring after the step [B, W, D]."""
        if which not in self._tables:
            delay = self.dmc.merge_delay
            if which == "leaving":
                self._tables[which] = self.rope((self.positions_B - delay).clamp_min(0))
            else:
                last_B1 = self.positions_B[:, None]
                w_W = torch.arange(delay, device=last_B1.device)
                positions_BW = (last_B1 - torch.remainder(last_B1 - w_W, delay)).clamp_min(0)
                cos, sin = self.rope(positions_BW.flatten())
                shape = (*positions_BW.shape, -1)
                self._tables[which] = (cos.view(shape), sin.view(shape))
        return self._tables[which]

    def _ring_block(self, cache: PagedKVCache, layer, seq_ids_B) -> RingBlock:
        """The exact ring after this step's push, read in place, with its RoPE tables."""
        exact = cache.exact
        cos_BWD, sin_BWD = self._table("ring")
        dtype = exact.k_LBGWD.dtype
        lengths_B = (self.positions_B + 1).clamp_max(self.dmc.merge_delay)
        return RingBlock(exact.k_LBGWD[layer], exact.v_LBGWD[layer], seq_ids_B,
                         cos_BWD.to(dtype), sin_BWD.to(dtype), lengths_B)  # fmt: skip
