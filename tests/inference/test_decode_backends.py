"""The page-blocked decode backends == the plain reference (fp32 <= 1e-5, fp64 <= 1e-10)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megatron_dmc.inference import CacheConfig, PagedKVCache, paged_cpu
from megatron_dmc.inference.attention import paged_attention_blocked, paged_attention_reference
from megatron_dmc.inference.decode import get_backend
from tests.inference.helpers import long_vanilla_cache, random_qkv, run_layer

BACKENDS = {
    "blocked": functools.partial(paged_attention_blocked, block_pages=2),
    "paged": paged_cpu.paged_attention_inplace,
}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _ragged_cache(dtype, heads=6, groups=2, head_dim=16, page_size=4):
    """A DMC cache of three sequences (70, 33 and 5 tokens) with merges and ragged heads."""
    q, k, v = random_qkv(3, heads, groups, 70, head_dim, seed=3, dtype=dtype)
    _, cache = run_layer(q, k, v, torch.tensor([70, 33, 5]), 20, page_size=page_size)
    return cache


@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backend_matches_reference(name, dtype):
    cache = _ragged_cache(dtype)
    seq = torch.tensor([2, 0, 1])
    query = torch.randn(3, 6, 16, dtype=dtype, generator=torch.Generator().manual_seed(0))
    expected = paged_attention_reference(query, cache, 0, seq)
    actual = BACKENDS[name](query, cache, 0, seq)
    error = float((actual - expected).abs().max() / expected.abs().max())
    assert error <= TOLERANCE[dtype], error


def _filled_cache(dtype, lengths, groups, head_dim, page_size=16, seed=5):
    """A vanilla cache whose streams hold random keys / values on shuffled pages, ragged
    per (sequence, KV head)."""
    batch, width = len(lengths), -(-max(lengths) // page_size)
    gen = torch.Generator().manual_seed(seed)
    config = CacheConfig(num_layers=1, num_kv_heads=groups, head_dim=head_dim, compress=False,
                         num_pages=batch * groups * width, max_batch=batch,
                         max_seq_len=width * page_size, page_size=page_size, dtype=dtype)  # fmt: skip
    cache = PagedKVCache(config)
    cache.add_sequences(batch)
    pool = cache.pool
    pool.k_pages_PND.copy_(torch.randn(pool.k_pages_PND.shape, generator=gen, dtype=dtype))
    pool.v_pages_PND.copy_(torch.randn(pool.v_pages_PND.shape, generator=gen, dtype=dtype))
    pages = torch.randperm(config.num_pages, generator=gen).view(batch, groups, width)
    cache.block_table_LBGM[0, :, :, :width] = pages
    offsets = torch.arange(groups) * 37
    cache.lengths_LBG[0] = (torch.tensor(lengths)[:, None] - offsets).clamp_min(1)
    return cache


@pytest.mark.parametrize("head_dim", [64, 128, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_paged_kernel_long_streams_match_reference(head_dim, dtype):
    """The compiled kernel at the real shapes (head dim 64 / 128 unrolled, 24 generic; 3
    query heads per KV head, pages of 16): streams of several 8-page blocks with a partial
    last page, pages in random order, and scores spread over > 100 (the exp's clamp)."""
    if paged_cpu.extension() is None:
        pytest.skip("compiled kernel not built here")
    cache = _filled_cache(dtype, [300, 129, 16, 1], groups=2, head_dim=head_dim)
    seq = torch.tensor([3, 1, 0, 2])
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(4, 6, head_dim, generator=gen, dtype=dtype)
    query[0] *= 30.0
    expected = paged_attention_reference(query, cache, 0, seq)
    actual = paged_cpu.paged_attention_inplace(query, cache, 0, seq)
    error = float((actual - expected).abs().max() / expected.abs().max())
    assert error <= TOLERANCE[dtype], error


@pytest.mark.parametrize("backend", ["blocked", "paged"])
def test_decode_through_backend_equals_padded(backend):
    q, k, v = random_qkv(2, 4, 2, 48, 8, seed=1)
    lengths = torch.tensor([48, 31])
    expected, _ = run_layer(q, k, v, lengths, prefill_len=17, backend="padded")
    actual, _ = run_layer(q, k, v, lengths, prefill_len=17, backend=backend)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_paged_kernel_is_built():
    """scripts/setup.sh builds it; without a compiler the backend falls back (next test)."""
    if paged_cpu.extension() is None:
        pytest.skip(
            "compiled kernel not built here: python -m megatron_dmc.inference.paged_cpu --build"
        )
    assert get_backend("paged") is paged_cpu.paged_attention_inplace


def test_paged_falls_back_to_torch_path_when_not_built(monkeypatch):
    cache = _ragged_cache(torch.float64)
    seq = torch.arange(3)
    query = torch.randn(3, 6, 16, dtype=torch.float64)
    monkeypatch.setattr(paged_cpu, "extension", lambda: None)
    expected = paged_attention_blocked(query, cache, 0, seq)
    torch.testing.assert_close(paged_cpu.paged_attention_inplace(query, cache, 0, seq), expected)


def _peak_bytes(fn) -> int:
    """Peak of the bytes fn's allocations hold at once (the profiler's alloc/free records)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    for record in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += record.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_no_allocation_proportional_to_the_cache(name):
    """A long vanilla cache: the backends hold far less than the cache at once; padded copies it."""
    batch, groups, length, dim = 4, 2, 2048, 16
    cache, seq = long_vanilla_cache(batch, groups, length, dim)
    query = torch.randn(batch, 2 * groups, dim)
    cache_bytes = 2 * cache.pool.k_pages_PND.numel() * 4
    padded = _peak_bytes(lambda: get_backend("padded")(query, cache, 0, seq))
    ours = _peak_bytes(lambda: BACKENDS[name](query, cache, 0, seq))
    assert padded >= cache_bytes
    assert ours < cache_bytes / 4, (ours, cache_bytes)
