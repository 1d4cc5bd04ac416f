"""Compressed-cache inference: ragged per-head paged KV cache, parallel prefill, decode."""

from megatron_dmc.inference.attention import paged_attention_padded, paged_attention_reference
from megatron_dmc.inference.kv_cache import CacheConfig, ChunkKV, PagedKVCache
from megatron_dmc.inference.pool import CacheFullError, PagePool
from megatron_dmc.inference.stats import CacheStats, cache_stats
from megatron_dmc.inference.window import WindowState

__all__ = [
    "CacheConfig",
    "CacheFullError",
    "CacheStats",
    "ChunkKV",
    "PagePool",
    "PagedKVCache",
    "WindowState",
    "cache_stats",
    "paged_attention_padded",
    "paged_attention_reference",
]
