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


LAYER_STATE = ("block_table_LBGM", "lengths_LBG", "ring_k_LBGWD", "ring_v_LBGWD",
               "ring_w_LBGW", "run_len_LBG", "seen_LB")  # fmt: skip
"""The cache's per-layer state the call writes, passed as one layer's views."""
NO_SEEN = torch.zeros(0, dtype=torch.long)


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
    count_seen: bool,
) -> bool:
    """`PagedKVCache._apply` through the compiled call (with `count_seen`, the token is also
    counted in seen_LB); False (nothing written) where it does not apply. A vanilla cache
    rounds keys to its dtype after RoPE in the model's, so it needs keys already in the
    cache dtype."""
    config, pool = cache.config, cache.pool
    dtype = config.dtype
    if dtype not in DTYPES or pool.k_pages_PND.device.type != "cpu":
        return False
    if not config.compress and k_BGD.dtype != dtype:
        return False
    module = compiled.load()
    if module is None:
        return False
    table, lengths, ring_k, ring_v, ring_w, run_len, seen = layer_views(cache, layer)
    free = module.cache_append(
        pool.k_pages_PND, pool.v_pages_PND, table, lengths, ring_k, ring_v, ring_w, run_len,
        seq_ids_B, k_BGD.to(dtype), v_BGD.to(dtype), alpha_BG.bool(), omega_BG.to(dtype),
        cos_BD.to(dtype), sin_BD.to(dtype), pool.free_P, pool.num_free,
        seen if count_seen else NO_SEEN, config.compress, config.decision_channel,
    )  # fmt: skip
    if free < 0:
        return False
    pool.num_free = free
    pool.peak_in_use = max(pool.peak_in_use, pool.pages_in_use)
    return True


def layer_views(cache, layer: int) -> tuple[torch.Tensor, ...]:
    """Layer `layer`'s view of each LAYER_STATE tensor, made once per cache (remade if a
    tensor was replaced: the views keep the old one alive, so its id is not reused)."""
    bases = tuple(getattr(cache, name) for name in LAYER_STATE)
    key = tuple(map(id, bases))
    memo = cache.__dict__.get("_layer_views")
    if memo is None or memo[0] != key:
        views = [tuple(base[index] for base in bases) for index in range(cache.config.num_layers)]
        memo = cache.__dict__["_layer_views"] = (key, views)
    return memo[1][layer]
