"""The compiled cache write (cache_append.py) == the torch path (PagedKVCache._apply): rings,
run lengths, block tables, pages and slot counts after many decode tokens with merges,
appends and page boundaries (fp32 <= 1e-5, fp64 <= 1e-10); delayed DMC and DMS through
append_delayed; refusals and the pool's growth left to the torch path; whole-model decode
logits through both."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_dmc.inference import PagedKVCache, compiled
from megatron_dmc.inference.pool import CacheFullError
from megatron_dmc.ops import DMCConfig, rope_cos_sin
from tests.inference.helpers import make_cache
from tests.inference.model_helpers import tiny_model

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
EXACT = ("lengths_LBG", "run_len_LBG", "block_table_LBGM", "seen_LB")


class Counting:
    """The built module with its cache_append calls counted (written: it wrote the cache)."""

    def __init__(self, module) -> None:
        self.module, self.written = module, 0

    def cache_append(self, *args):
        free = self.module.cache_append(*args)
        self.written += free >= 0
        return free


@pytest.fixture(autouse=True)
def calls(monkeypatch):
    module = compiled.load()
    if module is None:
        pytest.skip(
            "compiled extension not built here: python -m megatron_dmc.inference.paged_cpu --build"
        )
    counting = Counting(module)
    monkeypatch.setattr(compiled, "load", lambda: counting)
    return counting


def _tokens(batch, groups, dim, steps, dtype, seed=0):
    """Random k, v, omega, alpha and RoPE tables per step; long runs after step 30."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        k, v = (torch.randn(batch, groups, dim, generator=gen, dtype=dtype) for _ in range(2))
        omega = torch.rand(batch, groups, generator=gen, dtype=dtype)
        alpha = torch.rand(batch, groups, generator=gen) < (0.5 if step < 30 else 0.97)
        cos, sin = rope_cos_sin(torch.full((batch,), step), dim, 10000.0, dtype)
        yield k, v, alpha, omega, cos, sin


def _pair(**kw):
    caches = []
    for fused in (False, True):
        cache = make_cache(4, 2, 8, 80, page_size=4, **kw)
        cache.add_sequences(4)
        cache.fused_append = fused
        caches.append(cache)
    return caches


def _assert_same(plain, fast, dtype):
    for name in EXACT:
        assert torch.equal(getattr(plain, name), getattr(fast, name)), name
    assert torch.equal(plain.pool.free_P, fast.pool.free_P)
    assert (plain.pool.num_free, plain.pool.peak_in_use) == (
        fast.pool.num_free,
        fast.pool.peak_in_use,
    )
    pairs = [(plain.ring_k_LBGWD, fast.ring_k_LBGWD), (plain.ring_v_LBGWD, fast.ring_v_LBGWD),
             (plain.ring_w_LBGW, fast.ring_w_LBGW), (plain.pool.k_flat, fast.pool.k_flat),
             (plain.pool.v_flat, fast.pool.v_flat), (plain.exact.k_LBGWD, fast.exact.k_LBGWD)]  # fmt: skip
    for expected, actual in pairs:
        if expected.numel():
            error = float((actual - expected).abs().max() / expected.abs().max())
            assert error <= TOLERANCE[dtype], error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seq", [[0, 1, 2], [3, 0, 2]])
@pytest.mark.parametrize(
    ("compress", "channel", "window"),
    [(True, True, 12), (True, False, 12), (True, False, 1), (False, True, 12)],
)
def test_compiled_append_equals_torch_path(calls, dtype, seq, compress, channel, window):
    """DMC channel and heads mode (window 12), DMS's one-token slots (window 1), vanilla."""
    plain, fast = _pair(dtype=dtype, compress=compress, decision_channel=channel, window=window)
    seq_ids = torch.tensor(seq)
    for k, v, alpha, omega, cos, sin in _tokens(3, 2, 8, 70, dtype):
        for cache in (plain, fast):
            cache.append(0, seq_ids, k, v, alpha, omega, cos, sin)
    assert calls.written == 70
    _assert_same(plain, fast, dtype)
    if compress:
        assert int((plain.run_len_LBG > window).sum()) > 0  # runs beyond the window
        assert int(plain.lengths_LBG.max()) > 4  # streams cross page boundaries


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("channel", "window"), [(True, 12), (False, 1)])
def test_compiled_append_delayed_equals_torch_path(calls, dtype, channel, window):
    """A merge delay of 5: tokens reach the paged slots only as they leave the exact ring
    (the rows still inside it are skipped), DMC channel mode and DMS."""
    plain, fast = _pair(dtype=dtype, decision_channel=channel, window=window, merge_delay=5)
    seq_ids = torch.tensor([2, 0, 1])
    for k, v, alpha, omega, cos, sin in _tokens(3, 2, 8, 60, dtype, seed=3):
        for cache in (plain, fast):
            cache.append_delayed(0, seq_ids, k, v, alpha, omega, cos, sin)
    assert calls.written == 60 - 5
    _assert_same(plain, fast, dtype)


def test_full_pool_left_to_the_torch_path(calls):
    """Too few free pages at a page boundary: the compiled call writes nothing and the torch
    path raises CacheFullError; a growable pool grows there and the write goes through."""
    for growable in (False, True):
        config = make_cache(2, 2, 8, 40, num_pages=5).config
        cache = PagedKVCache(dataclasses.replace(config, growable=growable))
        seq_ids = cache.add_sequences(2)
        appends = torch.zeros(2, 2, dtype=torch.bool)
        tokens = _tokens(2, 2, 8, 5, torch.float64)
        for _ in range(4):  # pages of 4 slots: four pages taken, one left
            k, v, _, omega, cos, sin = next(tokens)
            cache.append(0, seq_ids, k, v, appends, omega, cos, sin)
        lengths, pages = cache.lengths_LBG.clone(), cache.pool.k_flat.clone()
        k, v, _, omega, cos, sin = next(tokens)
        if growable:
            cache.append(0, seq_ids, k, v, appends, omega, cos, sin)
            assert cache.pool.num_pages > 5 and int(cache.lengths_LBG.sum()) == 20
            continue
        written = calls.written
        with pytest.raises(CacheFullError):
            cache.append(0, seq_ids, k, v, appends, omega, cos, sin)
        assert calls.written == written == 4
        assert torch.equal(cache.lengths_LBG, lengths) and torch.equal(cache.pool.k_flat, pages)


def test_unbuilt_extension_runs_the_torch_path(calls, monkeypatch):
    monkeypatch.setattr(compiled, "load", lambda: None)
    plain, fast = _pair(dtype=torch.float64)
    for k, v, alpha, omega, cos, sin in _tokens(4, 2, 8, 20, torch.float64):
        plain.append(0, torch.arange(4), k, v, alpha, omega, cos, sin)
        fast.append(0, torch.arange(4), k, v, alpha, omega, cos, sin)
    _assert_same(plain, fast, torch.float64)


@pytest.mark.parametrize(
    "dmc", [None, DMCConfig(), DMCConfig(decision_source="heads", merge_delay=6)]
)
def test_model_decode_logits_equal(calls, dmc):
    """Vanilla, DMC channel mode and decision heads with a delay: decode logits (fp32) and
    slot counts through the compiled write == through the torch path."""
    model = tiny_model(dmc=False if dmc is None else dmc)
    tokens = torch.randint(0, 97, (3, 30), generator=torch.Generator().manual_seed(4))
    results = []
    for fused in (False, True):
        cache = PagedKVCache(model.cache_config(3 * 2 * 2 * 10, 3, 30, page_size=3))
        cache.fused_append = fused
        seq = cache.add_sequences(3)
        logits = [model.prefill(tokens[:, :7], torch.full((3,), 7), cache, seq)]
        logits += [model.decode(tokens[:, t], cache, seq, "reference") for t in range(7, 30)]
        results.append((torch.stack(logits), cache.slot_counts()))
    assert calls.written == 23 * 2  # every layer of every decode step
    (expected, slots), (actual, fast_slots) = results
    assert torch.equal(slots, fast_slots)
    assert float((actual - expected).abs().max() / expected.abs().max()) <= 1e-5
