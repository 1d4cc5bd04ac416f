"""Delay-aware decode: every fast backend attends the paged slots and the exact ring in one
softmax, equal to the gather reference (fp32 <= 1e-5, fp64 <= 1e-10), for DMC with a merge
delay and for DMS; none copies the cache."""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_dmc.inference import paged_cpu
from megatron_dmc.inference.attention import (
    paged_attention_blocked,
    paged_attention_padded,
    paged_attention_reference,
)
from megatron_dmc.ops import DMCConfig, dms_config
from tests.inference.helpers import (
    INIT_VALUE,
    long_vanilla_cache,
    random_qkv,
    random_ring,
    run_layer,
)
from tests.inference.model_helpers import tiny_model
from tests.inference.test_decode_backends import _peak_bytes
from tests.inference.test_model_parity import _cached_logits, _rel_err

BACKENDS = {
    "blocked": functools.partial(paged_attention_blocked, block_pages=2),
    "paged": paged_cpu.paged_attention_inplace,
}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
DELAYED = DMCConfig(window_size=4, init_val=INIT_VALUE, merge_delay=6)


def _delayed_cache(dtype):
    """A delayed DMC cache of three ragged sequences (40, 23 and 4 tokens: one ring not full)."""
    q, k, v = random_qkv(3, 6, 2, 40, 16, seed=3, dtype=dtype)
    _, cache = run_layer(q, k, v, torch.tensor([40, 23, 4]), 20, dmc=DELAYED)
    return cache


def _ring(dtype, seen_B, window=6, groups=2, dim=16):
    return random_ring(len(seen_B), groups, window, dim, dtype, seen_B)


@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ring_block_matches_reference(name, dtype):
    cache = _delayed_cache(dtype)
    seq = torch.tensor([2, 0, 1])
    ring = _ring(dtype, [4, 40, 23])
    query = torch.randn(3, 6, 16, dtype=dtype, generator=torch.Generator().manual_seed(0))
    expected = paged_attention_reference(query, cache, 0, seq, ring=ring)
    for actual in (BACKENDS[name](query, cache, 0, seq, ring=ring),
                   paged_attention_padded(query, cache, 0, seq, ring=ring)):  # fmt: skip
        error = float((actual - expected).abs().max() / expected.abs().max())
        assert error <= TOLERANCE[dtype], error
    without = BACKENDS[name](query, cache, 0, seq)
    assert float((without - expected).abs().max()) > 1e-3, "the ring must change the output"


@pytest.mark.parametrize("backend", ["blocked", "paged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_delayed_decode_through_backend_equals_gather(backend, dtype):
    q, k, v = random_qkv(2, 4, 2, 36, 8, seed=1, dtype=dtype)
    lengths = torch.tensor([36, 21])
    expected, ref_cache = run_layer(q, k, v, lengths, 9, backend="padded", dmc=DELAYED)
    actual, cache = run_layer(q, k, v, lengths, 9, backend=backend, dmc=DELAYED)
    assert _rel_err(actual, expected) <= TOLERANCE[dtype]
    assert torch.equal(cache.slot_counts(), ref_cache.slot_counts())
    assert int(cache.lengths_LBG.sum()) < 2 * 2 * 36 - 2 * 2 * 6, "decisions really merged"


@pytest.mark.parametrize("backend", ["blocked", "paged"])
def test_dms_decode_through_backend_equals_gather(backend):
    model = tiny_model(dms_config(6), heads=4, groups=2)
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([40, 31])
    expected, _ = _cached_logits(model, tokens, lengths, 9, backend="padded")
    actual, cache = _cached_logits(model, tokens, lengths, 9, backend=backend)
    assert _rel_err(actual[:, 9:], expected[:, 9:]) <= 1e-5
    assert _rel_err(actual[:1, 8:], model(tokens)[:1, 8:]) <= 1e-5
    assert int(cache.slot_counts().sum()) < int(cache.seen_LB.sum()) * 2, "tokens were evicted"


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_ring_adds_no_copy_of_the_cache(name):
    """Long streams plus a ring: the backend holds far less than the cache at once."""
    batch, groups, length, dim = 3, 2, 2048, 16
    cache, seq = long_vanilla_cache(batch, groups, length, dim)
    ring = _ring(torch.float32, [40, 40, 40], dim=dim)
    query = torch.randn(batch, 2 * groups, dim)
    cache_bytes = 2 * cache.pool.k_pages_PND.numel() * 4
    ours = _peak_bytes(lambda: BACKENDS[name](query, cache, 0, seq, ring=ring))
    assert ours < cache_bytes / 4, (ours, cache_bytes)


def test_kernel_reads_the_ring_in_place(monkeypatch):
    """The compiled kernel rotates the ring's keys itself: no torch copy of the rings."""
    if paged_cpu.extension() is None:
        pytest.skip("compiled kernel not built here")
    cache = _delayed_cache(torch.float64)
    seq = torch.tensor([1, 2, 0])
    ring = _ring(torch.float64, [40, 4, 23])
    query = torch.randn(3, 6, 16, dtype=torch.float64)
    expected = paged_attention_reference(query, cache, 0, seq, ring=ring)

    def no_copy(_self):
        raise AssertionError("the kernel path copied the rings")

    monkeypatch.setattr(type(ring), "keys_values", no_copy)
    actual = paged_cpu.paged_attention_inplace(query, cache, 0, seq, ring=ring)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
