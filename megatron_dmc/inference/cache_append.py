"""Decode's cache write as one compiled call per layer (csrc/cache_append.cpp).

Legend: B sequences, G KV heads, D head dim.

The torch path of a decode token's cache write (`PagedKVCache._apply`: the window-ring
merge, RoPE, page allocation, the page write and the slot count) is about 40 small torch
ops per layer, so at decode its cost is dispatch. The compiled `cache_append` does all of
it for every stream of the layer in one call, in the same order (new pages are taken from
the top of the free stack in (sequence, head) order, so the block tables are identical).
It runs for float32 and float64 caches on CPU where the extension is built; elsewhere, and
when the pool is short (the torch path then raises `CacheFullError` or grows the pool), the
torch path runs. Parity: tests/inference/test_cache_append.py.
"""

from __future__ import annotations

import torch

from megatron_dmc.inference import compiled

DTYPES = (torch.float32, torch.float64)


def compiled_append(
    cache,
    layer: int,
    seq_ids_B: torch.Tensor,
    k_BGD: torch.Tensor,
    v_BGD: torch.Tensor,
    alpha_BG: torch.Tensor,
    omega_BG: torch.Tensor,
    cos_BD: torch.Tensor,
    sin_BD: torch.Tensor,
) -> bool:
    """`PagedKVCache._apply` through the compiled call; False (nothing written) where it
    does not apply. A vanilla cache rounds keys to its dtype after RoPE in the model's, so
    it needs keys already in the cache dtype."""
    config, pool = cache.config, cache.pool
    dtype = config.dtype
    if dtype not in DTYPES or pool.k_pages_PND.device.type != "cpu":
        return False
    if not config.compress and k_BGD.dtype != dtype:
        return False
    module = compiled.load()
    if module is None:
        return False
    free = module.cache_append(
        pool.k_pages_PND, pool.v_pages_PND, cache.block_table_LBGM[layer],
        cache.lengths_LBG[layer], cache.ring_k_LBGWD[layer], cache.ring_v_LBGWD[layer],
        cache.ring_w_LBGW[layer], cache.run_len_LBG[layer], seq_ids_B, k_BGD.to(dtype),
        v_BGD.to(dtype), alpha_BG.bool(), omega_BG.to(dtype), cos_BD.to(dtype),
        sin_BD.to(dtype), pool.free_P, pool.num_free, config.compress, config.decision_channel,
    )  # fmt: skip
    if free < 0:
        return False
    pool.num_free = free
    pool.peak_in_use = max(pool.peak_in_use, pool.pages_in_use)
    return True
