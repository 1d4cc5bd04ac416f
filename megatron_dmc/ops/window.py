"""Delayed merging: the exact recent window, and which decisions have taken effect.

Legend: B batch, H query heads, G KV heads, R = H / G, T time, D head dim, W merge delay,
N blocks of W queries, K = 2W keys a block of queries can see.

With merge delay W, query i sees exactly k_j for i-W < j <= i and, unbiased, the open
slot ktilde_{i-W}: its "local" set of at most W + 1 keys. `local_attention` computes the
softmax over that set (and its log-normaliser, so that `dmc_attention` can fold it into
one SDPA call as a single key) with O(T * W) memory: queries in blocks of W, each block
against the 2W keys starting W before it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def counted_decisions(alpha_BGT: torch.Tensor, merge_delay: int) -> torch.Tensor:
    """The decisions that have taken effect at the end of the sequence: the last W zeroed.

    With W tokens always exact, a sequence of T tokens keeps W' = min(W, T) exact tokens
    plus the slots of the T - W' tokens that left the window: slots = T - sum of these
    counted alphas. So CR = T / slots = 1 / (1 - counted alpha sum / T), the paper's
    formula with the count still T; the compression loss takes the same sums.
    """
    if merge_delay == 0:
        return alpha_BGT
    length = alpha_BGT.shape[-1]
    kept = max(length - merge_delay, 0)
    return torch.cat([alpha_BGT[..., :kept], torch.zeros_like(alpha_BGT[..., kept:])], dim=-1)


def _pad_time(x_BGTD: torch.Tensor, front: int, back: int) -> torch.Tensor:
    return F.pad(x_BGTD, (0, 0, front, back))


def _key_blocks(x_BGTD: torch.Tensor, window: int, blocks: int) -> torch.Tensor:
    """[B, G, N, 2W, D]: for query block n, positions (n-1)W .. (n+1)W - 1 (zeros outside)."""
    b, g, t, d = x_BGTD.shape
    padded = _pad_time(x_BGTD, window, blocks * window - t).view(b, g, blocks + 1, window, d)
    return torch.cat([padded[:, :, :-1], padded[:, :, 1:]], dim=3)


def _band_mask(window: int, blocks: int, device: torch.device) -> torch.Tensor:
    """[N, W, 2W]: query a of block n sees key c iff a < c <= a + W and (n-1)W + c >= 0."""
    a_W1 = torch.arange(window, device=device)[:, None]
    c_1K = torch.arange(2 * window, device=device)[None, :]
    band_WK = (c_1K > a_W1) & (c_1K <= a_W1 + window)
    first_NWK = torch.arange(blocks, device=device)[:, None, None] > 0
    return band_WK[None] & (first_NWK | (c_1K >= window)[None])


def local_attention(
    q_BHTD: torch.Tensor,
    ktilde_BGTD: torch.Tensor,
    vtilde_BGTD: torch.Tensor,
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    merge_delay: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-normaliser [B, H, T], output [B, H, T, Dv]) of the softmax over the local set."""
    b, h, t, d = q_BHTD.shape
    g, w = k_BGTD.shape[1], merge_delay
    n = -(-t // w)
    q_BGRNWD = _pad_time(q_BHTD, 0, n * w - t).view(b, g, h // g, n, w, d)
    scores_BGRNWK = torch.einsum("bgrnwd,bgnkd->bgrnwk", q_BGRNWD, _key_blocks(k_BGTD, w, n))
    scores_BGRNWK = (scores_BGRNWK * scale).masked_fill(
        ~_band_mask(w, n, q_BHTD.device), float("-inf")
    )
    open_k_BGTD = _pad_time(ktilde_BGTD, w, 0)[:, :, :t]
    open_BHT = (q_BHTD * open_k_BGTD.repeat_interleave(h // g, dim=1)).sum(-1) * scale
    visible_T = torch.arange(t, device=q_BHTD.device) >= w
    open_BHT = open_BHT.masked_fill(~visible_T, float("-inf"))
    open_BGRNW1 = F.pad(open_BHT, (0, n * w - t)).view(b, g, h // g, n, w, 1)
    all_BGRNWL = torch.cat([scores_BGRNWK, open_BGRNW1], dim=-1)
    # One exp for the probabilities and the log-normaliser, none in the backward (a
    # logsumexp, then exp(all - lse), takes three over the scores).
    max_BGRNW1 = all_BGRNWL.detach().amax(dim=-1, keepdim=True)
    exp_BGRNWL = torch.exp(all_BGRNWL - max_BGRNW1)
    sum_BGRNW1 = exp_BGRNWL.sum(dim=-1, keepdim=True)
    probs_BGRNWL = exp_BGRNWL / sum_BGRNW1
    lse_BGRNW1 = max_BGRNW1 + torch.log(sum_BGRNW1)
    band_BGRNWD = torch.einsum(
        "bgrnwk,bgnkd->bgrnwd", probs_BGRNWL[..., :-1], _key_blocks(v_BGTD, w, n)
    )
    out_BHTD = band_BGRNWD.reshape(b, h, n * w, -1)[:, :, :t]
    open_v_BHTD = _pad_time(vtilde_BGTD, w, 0)[:, :, :t].repeat_interleave(h // g, dim=1)
    out_BHTD = out_BHTD + probs_BGRNWL[..., -1:].reshape(b, h, n * w, 1)[:, :, :t] * open_v_BHTD
    return lse_BGRNW1.reshape(b, h, n * w)[:, :, :t], out_BHTD
