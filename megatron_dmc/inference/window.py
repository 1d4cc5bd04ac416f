"""The open slot's window state: a ring of the last W contributions of its accumulation run.

Legend: B sequences, G KV heads, T time, D head dim, W window.

Run position p (0 = the token that opened the slot) lives at ring index p % W. Entries
that belong to no token have weight 0, so the running sums
    sum_wk = sum_ring w*k,  sum_wv = sum_ring w*v,  sum_w = sum_ring w
are recomputed from the ring at every merge (W adds per channel) instead of being updated
by subtraction, so they never drift over long runs. Keys are pre-RoPE, channel D-1 zeroed.
Raw k and v are stored in the cache dtype (they are exact there); w and the sums are in at
least float32.

Pure torch (no package import). API:

- `WindowState(k_BGWD, v_BGWD, w_BGW, run_len_BG)`, `.sums()`.
- `merge_step(state, k_BGD, v_BGD, w_BG, merge_BG) -> (state, slot_k_BGD, slot_v_BGD)`:
  one token of Algorithm 1.
- `state_after_chunk(state, k_BGTD, v_BGTD, w_BGT, append_BGT, lengths_B) -> state`: the
  state after a chunk, in one pass.
- `chronological(state) -> state`: the ring rotated oldest-first (to continue a chunk).
- `ExactRing(shape_LBG, delay, head_dim, dtype, state_dtype, device)`: delayed merging's
  W most recent tokens per stream; `push`, `fill`, `chronological`, `read`, `clear`,
  `nbytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WindowState:
    """Window state of a batch of streams of one layer (a copy; write back with the cache)."""

    k_BGWD: torch.Tensor
    v_BGWD: torch.Tensor
    w_BGW: torch.Tensor
    run_len_BG: torch.Tensor
    """Tokens in the open slot's accumulation run (may exceed W; 0 for an empty stream)."""

    def sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum_wk [B,G,D], sum_wv [B,G,D], sum_w [B,G]) over the ring."""
        w_BGW1 = self.w_BGW[..., None]
        return (w_BGW1 * self.k_BGWD).sum(2), (w_BGW1 * self.v_BGWD).sum(2), self.w_BGW.sum(2)


def merge_step(
    state: WindowState,
    k_BGD: torch.Tensor,
    v_BGD: torch.Tensor,
    w_BG: torch.Tensor,
    merge_BG: torch.Tensor,
) -> tuple[WindowState, torch.Tensor, torch.Tensor]:
    """One token of Algorithm 1: open a new run (merge False) or extend the run (True).

    Returns the new state and the open slot's pre-RoPE key and value [B, G, D]: the
    token itself after an append, the windowed weighted mean after a merge.
    """
    window = state.w_BGW.shape[-1]
    index_BG = torch.where(merge_BG, state.run_len_BG % window, 0)
    k_BGWD = state.k_BGWD * merge_BG[..., None, None]
    v_BGWD = state.v_BGWD * merge_BG[..., None, None]
    w_BGW = state.w_BGW * merge_BG[..., None]
    index_BG1D = index_BG[..., None, None].expand(*index_BG.shape, 1, k_BGD.shape[-1])
    k_BGWD = k_BGWD.scatter(2, index_BG1D, k_BGD[:, :, None].to(k_BGWD.dtype))
    v_BGWD = v_BGWD.scatter(2, index_BG1D, v_BGD[:, :, None].to(v_BGWD.dtype))
    w_BGW = w_BGW.scatter(2, index_BG[..., None], w_BG[..., None].to(w_BGW.dtype))
    run_len_BG = torch.where(merge_BG, state.run_len_BG + 1, 1)
    new = WindowState(k_BGWD, v_BGWD, w_BGW, run_len_BG)
    sum_wk_BGD, sum_wv_BGD, sum_w_BG = new.sums()
    merge_BG1 = merge_BG[..., None]
    slot_k_BGD = torch.where(merge_BG1, sum_wk_BGD / sum_w_BG[..., None], k_BGD.to(k_BGWD.dtype))
    slot_v_BGD = torch.where(merge_BG1, sum_wv_BGD / sum_w_BG[..., None], v_BGD.to(v_BGWD.dtype))
    return new, slot_k_BGD, slot_v_BGD


def state_after_chunk(
    state: WindowState,
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    w_BGT: torch.Tensor,
    append_BGT: torch.Tensor,
    lengths_B: torch.Tensor,
) -> WindowState:
    """The window state after a chunk of tokens, written in one pass (not token by token).

    append_BGT marks tokens that open a slot; tokens at t >= lengths_B[b] are padding.
    Only the last W valid tokens of the final run reach the ring.
    """
    batch, groups, length, _ = k_BGTD.shape
    window = state.w_BGW.shape[-1]
    t_T = torch.arange(length, device=k_BGTD.device)
    valid_BT = t_T < lengths_B[:, None]
    opens_BGT = append_BGT.bool() & valid_BT[:, None]
    start_BGT = torch.where(opens_BGT, t_T, -1).cummax(dim=-1).values
    run_pos_BGT = torch.where(start_BGT >= 0, t_T - start_BGT, state.run_len_BG[..., None] + t_T)

    last_BG = (lengths_B - 1).clamp_min(0)[:, None].expand(batch, groups)
    tail_BGW = last_BG[..., None] - torch.arange(window - 1, -1, -1, device=k_BGTD.device)
    tail_valid_BGW = tail_BGW >= 0
    tail_BGW = tail_BGW.clamp_min(0)
    final_start_BG = start_BGT.gather(2, last_BG[..., None]).squeeze(-1)
    in_run_BGW = (
        tail_valid_BGW & (tail_BGW >= final_start_BG[..., None]) & (lengths_B > 0)[:, None, None]
    )

    reset_BG = opens_BGT.any(dim=-1)
    keep_BG = ~reset_BG
    k_BGWD = state.k_BGWD * keep_BG[..., None, None]
    v_BGWD = state.v_BGWD * keep_BG[..., None, None]
    w_BGW = state.w_BGW * keep_BG[..., None]

    ring_BGW = run_pos_BGT.gather(2, tail_BGW) % window
    # Out-of-run tail entries are redirected to a scratch index W and dropped afterwards.
    ring_BGW = torch.where(in_run_BGW, ring_BGW, window)
    tail_BGWD = tail_BGW[..., None].expand(-1, -1, -1, k_BGTD.shape[-1])
    k_BGWD = _scatter_with_scratch(k_BGWD, ring_BGW, k_BGTD.gather(2, tail_BGWD))
    v_BGWD = _scatter_with_scratch(v_BGWD, ring_BGW, v_BGTD.gather(2, tail_BGWD))
    w_BGW = _scatter_with_scratch(w_BGW[..., None], ring_BGW, w_BGT.gather(2, tail_BGW)[..., None])
    final_pos_BG = run_pos_BGT.gather(2, last_BG[..., None]).squeeze(-1)
    run_len_BG = torch.where(lengths_B[:, None] > 0, final_pos_BG + 1, state.run_len_BG)
    return WindowState(k_BGWD, v_BGWD, w_BGW[..., 0], run_len_BG)


def _scatter_with_scratch(
    ring_BGWX: torch.Tensor, index_BGW: torch.Tensor, src_BGWX: torch.Tensor
) -> torch.Tensor:
    scratch_BGWX = torch.cat([ring_BGWX, ring_BGWX[:, :, :1]], dim=2)
    index_BGWX = index_BGW[..., None].expand(-1, -1, -1, ring_BGWX.shape[-1])
    scratch_BGWX = scratch_BGWX.scatter(2, index_BGWX, src_BGWX.to(ring_BGWX.dtype))
    return scratch_BGWX[:, :, :-1]


def chronological(state: WindowState) -> WindowState:
    """The ring rotated so that index W-1 holds the newest contribution (for chunked prefill)."""
    window = state.w_BGW.shape[-1]
    order_BGW = (
        state.run_len_BG[..., None] + torch.arange(window, device=state.w_BGW.device)
    ) % window
    order_BGWD = order_BGW[..., None].expand_as(state.k_BGWD)
    return WindowState(
        state.k_BGWD.gather(2, order_BGWD),
        state.v_BGWD.gather(2, order_BGWD),
        state.w_BGW.gather(2, order_BGW),
        state.run_len_BG,
    )


class ExactRing:
    """Delayed merging: the W most recent tokens of every stream, kept exact.

    Holds, per (layer, sequence, KV head), the pre-RoPE key (as it enters accumulation),
    the value, the hard decision alpha and the importance omega of each of the last W
    tokens; the token at position p lives at index p % W. A token's decision is applied
    to the compressed slots only when it leaves the ring (`push` returns it). Pure torch.

    Legend here: L layers, B batch rows, G KV heads, W merge delay, D head dim.
    """

    def __init__(
        self,
        shape_LBG: tuple[int, int, int],
        delay: int,
        head_dim: int,
        dtype: torch.dtype,
        state_dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.delay = delay
        self.k_LBGWD = torch.zeros(*shape_LBG, delay, head_dim, dtype=dtype, device=device)
        self.v_LBGWD = torch.zeros_like(self.k_LBGWD)
        self.alpha_LBGW = torch.zeros(*shape_LBG, delay, dtype=torch.bool, device=device)
        self.omega_LBGW = torch.zeros(*shape_LBG, delay, dtype=state_dtype, device=device)

    def nbytes(self) -> int:
        tensors = (self.k_LBGWD, self.v_LBGWD, self.alpha_LBGW, self.omega_LBGW)
        return sum(t.numel() * t.element_size() for t in tensors)

    def clear(self, seq_ids_B: torch.Tensor) -> None:
        for tensor in (self.k_LBGWD, self.v_LBGWD, self.alpha_LBGW, self.omega_LBGW):
            tensor[:, seq_ids_B] = 0

    def push(self, layer, seq_ids_B, positions_B, k_BGD, v_BGD, alpha_BG, omega_BG):
        """Store the token at positions_B; returns the entry it replaced (k, v, alpha, omega),
        the token at positions_B - W (meaningful where positions_B >= W)."""
        index_B = positions_B % self.delay
        rings = (self.k_LBGWD, self.v_LBGWD, self.alpha_LBGW, self.omega_LBGW)
        # [layer, rows, :, index] puts the row axis first: [B, G, ...]
        old = tuple(ring[layer, seq_ids_B, :, index_B] for ring in rings)
        for ring, new in zip(rings, (k_BGD, v_BGD, alpha_BG, omega_BG)):
            ring[layer, seq_ids_B, :, index_B] = new.to(ring.dtype)
        return old

    def fill(
        self, layer, seq_ids_B, k_BGTD, v_BGTD, alpha_BGT, omega_BGT, lengths_B, offset_B=None
    ) -> None:
        """Refill the ring with the last min(W, length) tokens of a run of tokens whose index
        0 sits at position offset_B (default 0); the ring then holds exactly those."""
        window = self.delay
        t_BW = lengths_B[:, None] - window + torch.arange(window, device=lengths_B.device)
        valid_BW = t_BW >= 0
        offset_B1 = 0 if offset_B is None else offset_B[:, None]
        index_BW = torch.remainder(t_BW + offset_B1, window)
        source_BW = t_BW.clamp_min(0)
        for tensor, chunk in zip(
            (self.k_LBGWD, self.v_LBGWD, self.alpha_LBGW, self.omega_LBGW),
            (k_BGTD, v_BGTD, alpha_BGT, omega_BGT),
        ):
            tensor[layer, seq_ids_B] = _ring_from_chunk(chunk, source_BW, valid_BW, index_BW).to(
                tensor.dtype
            )

    def chronological(self, layer, seq_ids_B, seen_B) -> tuple[torch.Tensor, ...]:
        """(k, v, alpha, omega) [B, G, W, ...], oldest first, after `seen_B` tokens: entry w
        is the token at position seen - W + w (zeros where that position is negative)."""
        w_W = torch.arange(self.delay, device=seen_B.device)
        index_BW = torch.remainder(seen_B[:, None] - self.delay + w_W, self.delay)
        out = []
        for ring in (self.k_LBGWD, self.v_LBGWD, self.alpha_LBGW, self.omega_LBGW):
            rows_BGW_ = ring[layer, seq_ids_B]
            extra = rows_BGW_.shape[3:]
            index = index_BW[:, None].reshape(*index_BW.shape[:1], 1, -1, *[1] * len(extra))
            out.append(rows_BGW_.gather(2, index.expand(-1, rows_BGW_.shape[1], -1, *extra)))
        return tuple(out)

    def read(self, layer, seq_ids_B, seen_B) -> tuple[torch.Tensor, ...]:
        """(k [B,G,W,D], v [B,G,W,D], positions [B,W], valid [B,W]) after `seen_B` tokens."""
        w_W = torch.arange(self.delay, device=seen_B.device)
        last_B1 = seen_B[:, None] - 1
        positions_BW = last_B1 - torch.remainder(last_B1 - w_W, self.delay)
        return (
            self.k_LBGWD[layer, seq_ids_B],
            self.v_LBGWD[layer, seq_ids_B],
            positions_BW,
            positions_BW >= 0,
        )


def _ring_from_chunk(chunk_BGT_, source_BW, valid_BW, index_BW) -> torch.Tensor:
    """[B, G, W, ...]: chunk token source_BW[b, w] at ring index index_BW[b, w] (0 if invalid)."""
    extra = chunk_BGT_.shape[3:]
    b, g = chunk_BGT_.shape[:2]
    source = source_BW[:, None].expand(b, g, -1).reshape(b, g, -1, *[1] * len(extra))
    picked = chunk_BGT_.gather(2, source.expand(b, g, -1, *extra))
    mask = valid_BW[:, None].reshape(b, 1, -1, *[1] * len(extra))
    picked = torch.where(mask, picked, torch.zeros_like(picked))
    order = index_BW[:, None].expand(b, g, -1).reshape(b, g, -1, *[1] * len(extra))
    return torch.zeros_like(picked).scatter(2, order.expand_as(picked), picked)
