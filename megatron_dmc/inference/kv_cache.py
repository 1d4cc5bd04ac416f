"""The compressed KV cache: ragged per-(layer, sequence, KV head) streams in one page pool.

Legend: L layers, B sequences (batch slots), G KV heads, T time, D head dim, W window,
M pages per stream (block-table width), N tokens per page, S cache slots, K page count.

A stream is one (layer, sequence, KV head). It owns a row of the block table
(`block_table_LBGM`, -1 = no page) and a length in slots (`lengths_LBG`). Cached keys are
RoPE-rotated at the position of the newest token of their slot; in DMC channel mode
channel D-1 is zeroed before and after the rotation (heads mode leaves every channel and
RoPE intact), and the open (last) slot is rewritten on every merge from the window state
(see window.py). Vanilla mode stores every token with plain RoPE and keeps no window state.

With a merge delay W (`CacheConfig.merge_delay`) the W most recent tokens of every stream
sit exact in an `ExactRing`; the paged slots are the compressed cache of the tokens that
left it (a token's decision is applied as it leaves). A stream's slot count is then
`lengths_LBG` + min(seen, W) (`slot_counts`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megatron_dmc.inference.cache_append import compiled_append
from megatron_dmc.inference.pool import CacheFullError, PagePool
from megatron_dmc.inference.ring_update import merge_in_place
from megatron_dmc.inference.window import (
    ExactRing,
    WindowState,
    chronological,
    merge_step,
    state_after_chunk,
)
from megatron_dmc.ops import (
    DMCConfig,
    apply_rope,
    rope_without_decision_channel,
    zero_decision_channel,
)


@dataclass(frozen=True)
class CacheConfig:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_pages: int
    """Pages in the shared pool: the KV memory budget is num_pages * page bytes."""

    max_batch: int
    """Sequences that can be live at once (rows of the block table)."""

    max_seq_len: int
    """Longest sequence in tokens; bounds the block-table width."""

    page_size: int = 16
    window: int = 12
    """DMC window (ignored in vanilla mode)."""

    compress: bool = True
    """False: vanilla mode, every token keeps its own slot, plain RoPE on all channels."""

    dtype: torch.dtype = torch.float32
    """Dtype of cached keys and values (and of the window's raw k, v); window weights and
    sums are kept in at least float32."""

    device: str = "cpu"

    decision_channel: bool = True
    """DMC channel mode: channel D-1 of keys is zeroed and left out of RoPE. False for
    decision heads (keys and RoPE intact)."""

    merge_delay: int = 0
    """W: the most recent W tokens of every stream stay exact (0: the paper)."""

    growable: bool = False
    """Double the page pool when it runs out instead of raising CacheFullError (evaluation,
    where one sequence's length is known only as it grows; serving keeps a fixed budget)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "num_pages", "max_batch", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.merge_delay < 0 or (self.merge_delay and not self.compress):
            raise ValueError(
                f"merge_delay must be >= 0 and needs a compressed cache; got {self.merge_delay}"
            )
        if self.page_size < 1 or self.window < 1 or self.head_dim < 2:
            raise ValueError(
                f"page_size ({self.page_size}) and window ({self.window}) must be >= 1 and "
                f"head_dim ({self.head_dim}) >= 2"
            )

    @property
    def pages_per_stream(self) -> int:
        return -(-self.max_seq_len // self.page_size)


@dataclass
class ChunkKV:
    """One layer's keys and values for a chunk of tokens, from the parallel (training) form.

    keys_BGTD are the RoPE-rotated partial accumulations the parallel attention saw
    (rotated at each token's own position, channel D-1 zeroed in DMC mode); values_BGTD the
    matching vtilde. The slot of a run is the partial accumulation at its last token.
    k_BGTD / v_BGTD / omega_BGT are the raw pre-RoPE tokens (channel D-1 zeroed) that feed
    the window state. alpha_BGT holds hard decisions (1 = merge); tokens at
    t >= lengths_B[b] are right padding.
    """

    keys_BGTD: torch.Tensor
    values_BGTD: torch.Tensor
    k_BGTD: torch.Tensor
    v_BGTD: torch.Tensor
    alpha_BGT: torch.Tensor
    omega_BGT: torch.Tensor
    lengths_B: torch.Tensor


class PagedKVCache:
    """Paged, per-head ragged KV cache for all layers of a model."""

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        c = config
        self.pool = PagePool(c.num_pages, c.page_size, c.head_dim, c.dtype, c.device, c.growable)
        shape_LBG = (c.num_layers, c.max_batch, c.num_kv_heads)
        self.block_table_LBGM = torch.full(
            (*shape_LBG, c.pages_per_stream), -1, dtype=torch.long, device=c.device
        )
        self.lengths_LBG = torch.zeros(shape_LBG, dtype=torch.long, device=c.device)
        self.seen_LB = torch.zeros(shape_LBG[:2], dtype=torch.long, device=c.device)
        self.live_B = torch.zeros(c.max_batch, dtype=torch.bool, device=c.device)
        window = c.window if c.compress else 0
        # Raw k and v are exact in the cache dtype; weights and sums use state_dtype.
        self.ring_k_LBGWD = torch.zeros(
            *shape_LBG, window, c.head_dim, dtype=c.dtype, device=c.device
        )
        self.ring_v_LBGWD = torch.zeros_like(self.ring_k_LBGWD)
        self.ring_w_LBGW = torch.zeros(*shape_LBG, window, dtype=self.state_dtype, device=c.device)
        self.run_len_LBG = torch.zeros_like(self.lengths_LBG)
        self.exact = ExactRing(
            shape_LBG, c.merge_delay, c.head_dim, c.dtype, self.state_dtype, c.device
        )
        self.merge_in_place = True
        """A token's merge writes the rings in place (ring_update.py); False: the plain
        reference, window.merge_step on a copy of the batch's rings."""
        self.fused_append = True
        """A decode token's cache write is one compiled call per layer where the extension
        is built (cache_append.py); False: the torch path below."""

    @property
    def state_dtype(self) -> torch.dtype:
        """Window state is kept in at least float32 whatever the cache dtype."""
        return torch.promote_types(self.config.dtype, torch.float32)

    def check_compatible(self, dmc: DMCConfig | None) -> None:
        """ValueError unless the cache mode and window match the layer's DMC config."""
        if (dmc is not None) != self.config.compress:
            mode = "compressed" if self.config.compress else "vanilla"
            want = "vanilla" if dmc is None else "DMC"
            raise ValueError(f"a {mode} cache cannot serve {want} attention; rebuild the cache")
        if dmc is None:
            return
        want = (dmc.window_size, dmc.uses_channel, dmc.merge_delay)
        have = (self.config.window, self.config.decision_channel, self.config.merge_delay)
        if want != have:
            raise ValueError(
                f"cache (window, decision_channel, merge_delay) = {have} differs from the "
                f"model's DMC config {want}; build the cache with model.cache_config(...)"
            )

    def key_in(self, k_BG_D: torch.Tensor) -> torch.Tensor:
        """A raw key as it enters accumulation: channel D-1 zeroed in channel mode only."""
        return zero_decision_channel(k_BG_D) if self.config.decision_channel else k_BG_D

    def rotate(self, x_BG_D: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE of a key (or query) as the cache stores it (per mode)."""
        if not self.config.compress:
            return apply_rope(x_BG_D, cos, sin)
        if self.config.decision_channel:
            return rope_without_decision_channel(x_BG_D, cos, sin)
        return apply_rope(x_BG_D, cos, sin)

    def slot_counts(self, seq_ids_B: torch.Tensor | None = None) -> torch.Tensor:
        """Kept slots per (layer, sequence, KV head): paged slots + exact ring entries."""
        rows = slice(None) if seq_ids_B is None else seq_ids_B
        exact_LB = self.seen_LB[:, rows].clamp_max(self.config.merge_delay)
        return self.lengths_LBG[:, rows] + exact_LB[..., None]

    # ---- sequence lifecycle -------------------------------------------------------------

    def add_sequences(self, count: int) -> torch.Tensor:
        """Reserve `count` free batch rows; returns their ids [B] (long)."""
        free_ids = (~self.live_B).nonzero().flatten()
        if count > free_ids.numel():
            raise CacheFullError(
                f"{count} new sequences requested but only {free_ids.numel()} of "
                f"{self.config.max_batch} batch rows are free; raise max_batch or wait for "
                "running sequences to finish"
            )
        seq_ids_B = free_ids[:count]
        self.live_B[seq_ids_B] = True
        return seq_ids_B

    def free_sequences(self, seq_ids_B: torch.Tensor) -> None:
        """Return every page of these sequences (all layers and heads) to the pool."""
        table_LBGM = self.block_table_LBGM[:, seq_ids_B]
        self.pool.release(table_LBGM[table_LBGM >= 0])
        self.block_table_LBGM[:, seq_ids_B] = -1
        for state in (self.lengths_LBG, self.run_len_LBG, self.ring_w_LBGW, self.ring_k_LBGWD):
            state[:, seq_ids_B] = 0
        self.ring_v_LBGWD[:, seq_ids_B] = 0
        self.exact.clear(seq_ids_B)
        self.seen_LB[:, seq_ids_B] = 0
        self.live_B[seq_ids_B] = False

    # ---- writes -------------------------------------------------------------------------

    def check_step_capacity(self, seq_ids_B: torch.Tensor) -> None:
        """Raise CacheFullError before a decode step that might not fit, writing nothing.

        A step adds at most one slot per stream, so it needs at most one new page for each
        stream whose length sits on a page boundary.
        """
        if bool((self.seen_LB[:, seq_ids_B] >= self.config.max_seq_len).any()):
            raise ValueError(
                f"a sequence already holds max_seq_len={self.config.max_seq_len} tokens; "
                "build the cache with a larger max_seq_len or stop generation earlier"
            )
        at_boundary = (self.lengths_LBG[:, seq_ids_B] % self.config.page_size == 0).sum()
        self.pool.check_available(int(at_boundary), "the next decode step (worst case)")

    def append(
        self,
        layer: int,
        seq_ids_B: torch.Tensor,
        k_BGD: torch.Tensor,
        v_BGD: torch.Tensor,
        alpha_BG: torch.Tensor,
        omega_BG: torch.Tensor,
        cos_BD: torch.Tensor,
        sin_BD: torch.Tensor,
    ) -> None:
        """Algorithm 1 for one new token of every sequence, all KV heads of one layer.

        k_BGD is the raw pre-RoPE key (channel D-1 may still hold the decision logit);
        alpha_BG the hard decision (1 = merge; ignored on an empty stream), omega_BG the
        importance; cos_BD / sin_BD the RoPE tables at each sequence's new position.
        With a merge delay use `append_delayed`.
        """
        assert self.config.merge_delay == 0, "a delayed cache is written by append_delayed"
        self._apply(layer, seq_ids_B, k_BGD, v_BGD, alpha_BG, omega_BG, cos_BD, sin_BD, True)

    def append_delayed(
        self,
        layer: int,
        seq_ids_B: torch.Tensor,
        k_BGD: torch.Tensor,
        v_BGD: torch.Tensor,
        alpha_BG: torch.Tensor,
        omega_BG: torch.Tensor,
        cos_leaving_BD: torch.Tensor,
        sin_leaving_BD: torch.Tensor,
    ) -> None:
        """One new token with a merge delay W: it enters the exact ring, and the token it
        displaces (position p - W) goes through Algorithm 1; cos/sin at position p - W."""
        positions_B = self.seen_LB[layer, seq_ids_B]
        key_BGD = self.key_in(k_BGD)
        old = self.exact.push(layer, seq_ids_B, positions_B, key_BGD, v_BGD, alpha_BG, omega_BG)
        leaving_B = positions_B >= self.config.merge_delay
        if bool(leaving_B.any()):
            rows = leaving_B.nonzero().flatten()
            k_old, v_old, alpha_old, omega_old = (t[rows] for t in old)
            self._apply(
                layer,
                seq_ids_B[rows],
                k_old,
                v_old,
                alpha_old,
                omega_old,
                cos_leaving_BD[rows],
                sin_leaving_BD[rows],
                False,
            )
        self.seen_LB[layer, seq_ids_B] += 1

    def _apply(
        self, layer, seq_ids_B, k_BGD, v_BGD, alpha_BG, omega_BG, cos_BD, sin_BD, count_seen
    ) -> None:
        """Algorithm 1 on the paged slots for one token per sequence; with `count_seen` the
        token is counted in seen_LB too."""
        if self.fused_append and compiled_append(
            self, layer, seq_ids_B, k_BGD, v_BGD, alpha_BG, omega_BG, cos_BD, sin_BD, count_seen
        ):
            return
        lengths_BG = self.lengths_LBG[layer, seq_ids_B]
        merge_BG = alpha_BG.bool() & (lengths_BG > 0) & self.config.compress
        if self.config.compress:
            key_BGD, value_BGD = self._merge(layer, seq_ids_B, k_BGD, v_BGD, omega_BG, merge_BG)
            key_BGD = self.rotate(key_BGD, cos_BD[:, None], sin_BD[:, None])
        else:
            key_BGD = apply_rope(k_BGD, cos_BD[:, None], sin_BD[:, None])
            value_BGD = v_BGD
        slot_BG = lengths_BG - merge_BG.long()
        self._ensure_pages(layer, seq_ids_B, lengths_BG, slot_BG + 1)
        rows_BG = self._rows(layer, seq_ids_B, slot_BG)
        self.pool.k_flat[rows_BG] = key_BGD.to(self.config.dtype)
        self.pool.v_flat[rows_BG] = value_BGD.to(self.config.dtype)
        self.lengths_LBG[layer, seq_ids_B] = slot_BG + 1
        if count_seen:
            self.seen_LB[layer, seq_ids_B] += 1

    def _merge(self, layer, seq_ids_B, k_BGD, v_BGD, omega_BG, merge_BG):
        if self.merge_in_place:
            return merge_in_place(
                self.ring_k_LBGWD[layer], self.ring_v_LBGWD[layer], self.ring_w_LBGW[layer],
                self.run_len_LBG[layer], seq_ids_B, self.key_in(k_BGD).to(self.config.dtype),
                v_BGD.to(self.config.dtype), omega_BG, merge_BG,
            )  # fmt: skip
        state, key_BGD, value_BGD = merge_step(
            self.window_state(layer, seq_ids_B),
            self.key_in(k_BGD).to(self.config.dtype),
            v_BGD.to(self.config.dtype),
            omega_BG.to(self.state_dtype),
            merge_BG,
        )
        self._store_window(layer, seq_ids_B, state)
        return key_BGD, value_BGD

    def write_chunk(self, layer: int, seq_ids_B: torch.Tensor, chunk: ChunkKV) -> None:
        """Store a chunk computed in parallel: closed slots, the open slot, window state.

        With a merge delay only a first chunk is accepted: its last min(W, length) tokens
        go to the exact ring, the earlier ones to the paged slots.
        """
        delay = self.config.merge_delay
        if delay == 0:
            self._write_slots(layer, seq_ids_B, chunk)
            return
        assert not bool(self.seen_LB[layer, seq_ids_B].any()), "delayed: first chunk only"
        left_B = (chunk.lengths_B - delay).clamp_min(0)
        leaving = dataclasses.replace(chunk, lengths_B=left_B)
        self.write_delayed(layer, seq_ids_B, leaving, chunk, torch.zeros_like(left_B))

    def write_delayed(
        self,
        layer: int,
        seq_ids_B: torch.Tensor,
        leaving: ChunkKV,
        recent: ChunkKV,
        offset_B: torch.Tensor,
    ) -> None:
        """With a merge delay: `leaving` (the tokens that left the exact ring, in parallel
        form) goes to the paged slots; the ring is refilled from the raw tokens of `recent`
        (the old ring entries followed by the new tokens, index 0 at position offset_B)."""
        seen_B = self.seen_LB[layer, seq_ids_B].clone()
        if leaving.k_BGTD.shape[2]:
            self._write_slots(layer, seq_ids_B, leaving)
        self.exact.fill(
            layer,
            seq_ids_B,
            recent.k_BGTD.to(self.config.dtype),
            recent.v_BGTD.to(self.config.dtype),
            recent.alpha_BGT.bool(),
            recent.omega_BGT,
            recent.lengths_B,
            offset_B,
        )
        self.seen_LB[layer, seq_ids_B] = offset_B + recent.lengths_B
        assert bool((self.seen_LB[layer, seq_ids_B] >= seen_B).all())

    def _write_slots(self, layer: int, seq_ids_B: torch.Tensor, chunk: ChunkKV) -> None:
        """The paged part of `write_chunk`.

        The slot of each run is the partial accumulation at the run's last token. A chunk
        that continues a sequence may merge its first token into the cached open slot; its
        keys must then already include the cached window (see `window_context`).
        """
        lengths_BG = self.lengths_LBG[layer, seq_ids_B]
        alpha_BGT = chunk.alpha_BGT.bool() & self.config.compress
        alpha_BGT[..., 0] &= lengths_BG > 0
        append_BGT = ~alpha_BGT
        t_T = torch.arange(alpha_BGT.shape[-1], device=alpha_BGT.device)
        valid_B1T = (t_T < chunk.lengths_B[:, None])[:, None]
        next_alpha_BGT = torch.cat([alpha_BGT[..., 1:], torch.zeros_like(alpha_BGT[..., :1])], -1)
        is_last_B1T = (t_T == chunk.lengths_B[:, None] - 1)[:, None]
        keep_BGT = valid_B1T & (~next_alpha_BGT | is_last_B1T)
        slot_BGT = lengths_BG[..., None] - 1 + (append_BGT & valid_B1T).long().cumsum(-1)
        new_lengths_BG = lengths_BG + (append_BGT & valid_B1T).sum(-1)
        self._ensure_pages(layer, seq_ids_B, lengths_BG, new_lengths_BG)
        b_K, g_K, t_K = keep_BGT.nonzero(as_tuple=True)
        table_KM = self.block_table_LBGM[layer, seq_ids_B[b_K], g_K]
        slot_K = slot_BGT[b_K, g_K, t_K]
        page_K = table_KM.gather(1, (slot_K // self.config.page_size)[:, None]).squeeze(1)
        rows_K = page_K * self.config.page_size + slot_K % self.config.page_size
        self.pool.k_flat[rows_K] = chunk.keys_BGTD[b_K, g_K, t_K].to(self.config.dtype)
        self.pool.v_flat[rows_K] = chunk.values_BGTD[b_K, g_K, t_K].to(self.config.dtype)
        if self.config.compress:
            state = state_after_chunk(
                self.window_state(layer, seq_ids_B),
                chunk.k_BGTD.to(self.config.dtype),
                chunk.v_BGTD.to(self.config.dtype),
                chunk.omega_BGT.to(self.state_dtype),
                append_BGT,
                chunk.lengths_B,
            )
            self._store_window(layer, seq_ids_B, state)
        self.lengths_LBG[layer, seq_ids_B] = new_lengths_BG
        self.seen_LB[layer, seq_ids_B] += chunk.lengths_B

    def _ensure_pages(self, layer, seq_ids_B, old_len_BG, new_len_BG) -> None:
        """Allocate the pages that slots [old_len, new_len) need, all streams at once."""
        size, width = self.config.page_size, self.config.pages_per_stream
        if bool((new_len_BG > width * size).any()):
            raise ValueError(
                f"a sequence outgrew max_seq_len={self.config.max_seq_len} cache slots; "
                "build the cache with a larger max_seq_len or stop generation earlier"
            )
        have_BG = -(-old_len_BG // size)
        need_BG = -(-new_len_BG // size)
        m_M = torch.arange(width, device=have_BG.device)
        new_BGM = (m_M >= have_BG[..., None]) & (m_M < need_BG[..., None])
        count = int(new_BGM.sum())
        if count == 0:
            return
        pages_K = self.pool.allocate(count, f"layer {layer}")
        table_BGM = self.block_table_LBGM[layer, seq_ids_B]
        table_BGM[new_BGM] = pages_K
        self.block_table_LBGM[layer, seq_ids_B] = table_BGM

    def _rows(self, layer: int, seq_ids_B: torch.Tensor, slot_BG: torch.Tensor) -> torch.Tensor:
        """Row in the pool's flat [P*N, D] view of slot_BG[b, g] (which must have a page)."""
        size = self.config.page_size
        table_BGM = self.block_table_LBGM[layer, seq_ids_B]
        page_BG = table_BGM.gather(-1, (slot_BG // size)[..., None]).squeeze(-1)
        assert bool((page_BG >= 0).all()), "slot without a page"
        return page_BG * size + slot_BG % size

    # ---- window state -------------------------------------------------------------------

    def window_state(self, layer: int, seq_ids_B: torch.Tensor) -> WindowState:
        return WindowState(
            self.ring_k_LBGWD[layer, seq_ids_B],
            self.ring_v_LBGWD[layer, seq_ids_B],
            self.ring_w_LBGW[layer, seq_ids_B],
            self.run_len_LBG[layer, seq_ids_B],
        )

    def window_context(self, layer: int, seq_ids_B: torch.Tensor) -> WindowState:
        """The open run's last W contributions, oldest first (weight 0 where none)."""
        return chronological(self.window_state(layer, seq_ids_B))

    def _store_window(self, layer: int, seq_ids_B: torch.Tensor, state: WindowState) -> None:
        self.ring_k_LBGWD[layer, seq_ids_B] = state.k_BGWD
        self.ring_v_LBGWD[layer, seq_ids_B] = state.v_BGWD
        self.ring_w_LBGW[layer, seq_ids_B] = state.w_BGW
        self.run_len_LBG[layer, seq_ids_B] = state.run_len_BG

    # ---- reads --------------------------------------------------------------------------

    def slot_rows(self, layer: int, seq_ids_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [B, G, S] into the flat pool, valid [B, G, S]) with S = the longest stream."""
        size = self.config.page_size
        lengths_BG = self.lengths_LBG[layer, seq_ids_B]
        longest = max(int(lengths_BG.max()) if lengths_BG.numel() else 0, 1)
        table_BGM = self.block_table_LBGM[layer, seq_ids_B][..., : -(-longest // size)]
        offsets_N = torch.arange(size, device=table_BGM.device)
        rows_BGS = (table_BGM[..., None] * size + offsets_N).flatten(-2)[..., :longest]
        valid_BGS = torch.arange(longest, device=rows_BGS.device) < lengths_BG[..., None]
        return torch.where(valid_BGS, rows_BGS, 0), valid_BGS

    def gather(
        self, layer: int, seq_ids_B: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys [B,G,S,D], values [B,G,S,D], valid [B,G,S]), S = the longest stream.

        Whole pages are copied (page-sized contiguous blocks); slots past a stream's length
        hold arbitrary finite pool data and must be masked with `valid`.
        """
        lengths_BG = self.lengths_LBG[layer, seq_ids_B]
        longest = max(int(lengths_BG.max()) if lengths_BG.numel() else 0, 1)
        table_BGM = self.block_table_LBGM[layer, seq_ids_B][
            ..., : -(-longest // self.config.page_size)
        ]
        pages_K = table_BGM.flatten().clamp_min(0)
        b, g, _ = table_BGM.shape
        keys_BGSD = self.pool.k_pages_PND.index_select(0, pages_K).view(
            b, g, -1, self.config.head_dim
        )
        values_BGSD = self.pool.v_pages_PND.index_select(0, pages_K).view(
            b, g, -1, self.config.head_dim
        )
        valid_BGS = torch.arange(longest, device=lengths_BG.device) < lengths_BG[..., None]
        return keys_BGSD[:, :, :longest], values_BGSD[:, :, :longest], valid_BGS
