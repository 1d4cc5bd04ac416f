"""Memory accounting of a PagedKVCache: bytes, per-layer / per-head CR, fragmentation.

Legend: L layers, B sequences, G KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dmc.inference.kv_cache import PagedKVCache


@dataclass
class CacheStats:
    pool_bytes: int
    """The whole preallocated pool (keys + values): the KV memory budget."""

    allocated_bytes: int
    """Bytes of the pages currently owned by some stream."""

    peak_allocated_bytes: int
    """High-water mark of allocated_bytes since the cache was built."""

    used_bytes: int
    """Bytes of the slots actually filled (allocated minus the unused tail of last pages)."""

    window_state_bytes: int
    """The DMC window rings and, with a merge delay, the exact rings of the W most recent
    tokens (preallocated for every batch row; 0 in vanilla)."""

    dense_bytes: int
    """What a dense cache in the pool dtype would need for the same tokens (no pages)."""

    fragmentation: float
    """Fraction of allocated slots left empty in partially filled last pages."""

    compression_ratio: float
    """Tokens seen / slots kept over all live streams."""

    cr_per_layer_L: torch.Tensor
    cr_per_head_LG: torch.Tensor
    lengths_LBG: torch.Tensor
    """Slots per live stream, exact ring entries included (dead rows are dropped)."""


def cache_stats(cache: PagedKVCache) -> CacheStats:
    live_B = cache.live_B
    lengths_LBG = cache.slot_counts(live_B.nonzero().flatten())
    seen_LBG = cache.seen_LB[:, live_B, None].expand_as(lengths_LBG)
    slots, seen = int(lengths_LBG.sum()), int(seen_LBG.sum())
    paged = int(cache.lengths_LBG[:, live_B].sum())
    page_bytes = cache.pool.page_bytes
    slot_bytes = page_bytes // cache.config.page_size
    allocated = cache.pool.pages_in_use * page_bytes
    ring_bytes = cache.exact.nbytes() + sum(
        t.numel() * t.element_size()
        for t in (cache.ring_k_LBGWD, cache.ring_v_LBGWD, cache.ring_w_LBGW)
    )
    return CacheStats(
        pool_bytes=cache.pool.num_pages * page_bytes,
        allocated_bytes=allocated,
        peak_allocated_bytes=cache.pool.peak_in_use * page_bytes,
        used_bytes=slots * slot_bytes,
        window_state_bytes=ring_bytes,
        dense_bytes=seen * slot_bytes,
        fragmentation=1.0 - paged * slot_bytes / allocated if allocated else 0.0,
        compression_ratio=seen / slots if slots else 1.0,
        cr_per_layer_L=_ratio(seen_LBG.sum((1, 2)), lengths_LBG.sum((1, 2))),
        cr_per_head_LG=_ratio(seen_LBG.sum(1), lengths_LBG.sum(1)),
        lengths_LBG=lengths_LBG.clone(),
    )


def _ratio(seen: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return seen.double() / slots.clamp_min(1).double()
