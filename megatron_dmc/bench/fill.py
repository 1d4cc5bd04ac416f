"""Fill a batch's cache cheaply: prefill one prompt, then copy its streams to every row.

Legend: L layers, G KV heads, M pages per stream, B sequences.

A decode step's cost depends on the streams' lengths, not on what the slots hold, so the
benchmarks prefill one real prompt (real weights, real decisions) and give every other
sequence of the batch a page-for-page copy of it, instead of prefilling B prompts.
"""

from __future__ import annotations

import torch

from megatron_dmc.inference.kv_cache import PagedKVCache


def replicate_first(cache: PagedKVCache, seq_ids_B: torch.Tensor) -> None:
    """Copy sequence seq_ids_B[0]'s pages, lengths, window state and exact ring (a merge
    delay's W newest tokens) to seq_ids_B[1:]; their previous contents are overwritten."""
    source = int(seq_ids_B[0])
    table_LGM = cache.block_table_LBGM[:, source]
    used_LGM = table_LGM >= 0
    source_pages_K = table_LGM[used_LGM]
    pool = cache.pool
    for target in seq_ids_B[1:].tolist():
        pages_K = pool.allocate(source_pages_K.numel(), "copying a prefilled sequence")
        pool.k_pages_PND[pages_K] = pool.k_pages_PND[source_pages_K]
        pool.v_pages_PND[pages_K] = pool.v_pages_PND[source_pages_K]
        target_LGM = torch.full_like(table_LGM, -1)
        target_LGM[used_LGM] = pages_K
        cache.block_table_LBGM[:, target] = target_LGM
        exact = cache.exact
        for state in (cache.lengths_LBG, cache.seen_LB, cache.run_len_LBG, cache.ring_k_LBGWD,
                      cache.ring_v_LBGWD, cache.ring_w_LBGW, exact.k_LBGWD, exact.v_LBGWD,
                      exact.alpha_LBGW, exact.omega_LBGW):  # fmt: skip
            state[:, target] = state[:, source]
