"""One token of Algorithm 1 on the cache's window rings, written in place (decode).

Legend: X batch rows of the cache, B sequences, G KV heads, W window, D head dim.

`window.merge_step` is the plain reference: it takes a copy of the batch's rings, builds
the new rings (zeroed where a run starts) and the cache writes them back, about six
[B, G, W, D] temporaries per layer and step. Here only the written ring entries move: the
new contribution goes to its ring index, a stream that opens a run has its ring cleared,
and the weighted sums are one batched product of the weights with the rings, read in place
when the batch's rows are consecutive (else through one copy of the batch's rows). Same
results as merge_step (the sums are added in another order); parity in
tests/inference/test_ring_update.py.
"""

from __future__ import annotations

import torch


def batch_rows(ring_X: torch.Tensor, seq_ids_B: torch.Tensor) -> torch.Tensor:
    """ring_X[seq_ids_B]: a view when the ids are consecutive, else a copy."""
    count = seq_ids_B.numel()
    first = int(seq_ids_B[0]) if count else 0
    if count and int(seq_ids_B[-1]) == first + count - 1 and bool((seq_ids_B.diff() == 1).all()):
        return ring_X[first : first + count]
    return ring_X.index_select(0, seq_ids_B)


def merge_in_place(
    ring_k_XGWD: torch.Tensor,
    ring_v_XGWD: torch.Tensor,
    ring_w_XGW: torch.Tensor,
    run_len_XG: torch.Tensor,
    seq_ids_B: torch.Tensor,
    k_BGD: torch.Tensor,
    v_BGD: torch.Tensor,
    w_BG: torch.Tensor,
    merge_BG: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """merge_step on one layer's rings (modified in place); returns the open slot's pre-RoPE
    key and value [B, G, D] in the sums' dtype. k_BGD / v_BGD in the rings' dtype."""
    batch, groups = merge_BG.shape
    window = ring_w_XGW.shape[-1]
    run_BG = run_len_XG[seq_ids_B]
    index_BG = torch.where(merge_BG, run_BG % window, 0)
    b_BG = seq_ids_B[:, None].expand(batch, groups)
    g_BG = torch.arange(groups, device=seq_ids_B.device).expand(batch, groups)
    fresh_BG = ~merge_BG
    fresh_b, fresh_g = b_BG[fresh_BG], g_BG[fresh_BG]
    ring_k_XGWD[fresh_b, fresh_g] = 0
    ring_v_XGWD[fresh_b, fresh_g] = 0
    ring_w_XGW[fresh_b, fresh_g] = 0
    ring_k_XGWD[b_BG, g_BG, index_BG] = k_BGD
    ring_v_XGWD[b_BG, g_BG, index_BG] = v_BGD
    ring_w_XGW[b_BG, g_BG, index_BG] = w_BG.to(ring_w_XGW.dtype)
    run_len_XG[seq_ids_B] = torch.where(merge_BG, run_BG + 1, 1)
    w_BG1W = batch_rows(ring_w_XGW, seq_ids_B)[:, :, None]
    sums = torch.promote_types(ring_k_XGWD.dtype, ring_w_XGW.dtype)
    k_BGWD, v_BGWD = (batch_rows(r, seq_ids_B).to(sums) for r in (ring_k_XGWD, ring_v_XGWD))
    sum_w_BG1 = w_BG1W.sum(-1)
    merge_BG1 = merge_BG[..., None]
    slot_k_BGD = torch.where(merge_BG1, (w_BG1W @ k_BGWD)[:, :, 0] / sum_w_BG1, k_BGD.to(sums))
    slot_v_BGD = torch.where(merge_BG1, (w_BG1W @ v_BGWD)[:, :, 0] / sum_w_BG1, v_BGD.to(sums))
    return slot_k_BGD, slot_v_BGD
