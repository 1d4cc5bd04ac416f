"""Real memory: pages only for kept slots, freed on finish, accounted; refusals before writes."""

from __future__ import annotations

import pytest
import torch

from megatron_dmc.inference import CacheFullError, PagedKVCache, cache_stats
from megatron_dmc.inference.decisions import ForcedRate
from tests.inference.model_helpers import tiny_model

LENGTH, PAGE, CR = 64, 4, 4.0


def _forced_model():
    model = tiny_model(heads=4, groups=2)
    model.forced = ForcedRate(CR)
    return model


def _prefill(model, num_pages, batch=2):
    cache = PagedKVCache(model.cache_config(num_pages, batch, LENGTH + 8, page_size=PAGE))
    seq = cache.add_sequences(batch)
    tokens = torch.randint(0, 97, (batch, LENGTH), generator=torch.Generator().manual_seed(0))
    model.prefill(tokens, torch.full((batch,), LENGTH), cache, seq)
    return cache, seq


def test_prefill_fits_in_a_pool_far_smaller_than_dense():
    model = _forced_model()
    streams = model.shape.num_hidden_layers * 2 * model.shape.num_key_value_heads
    dense_pages = streams * LENGTH // PAGE
    compressed_pages = streams * -(-(int(LENGTH / CR) + 1) // PAGE)
    cache, _ = _prefill(model, compressed_pages)
    stats = cache_stats(cache)
    assert stats.compression_ratio == pytest.approx(CR, rel=0.07)
    assert cache.pool.peak_in_use <= compressed_pages < dense_pages / 3
    assert stats.allocated_bytes <= 1.3 * stats.dense_bytes / CR
    assert 0.0 <= stats.fragmentation < 0.25
    with pytest.raises(CacheFullError, match="pool exhausted"):
        _prefill(model, compressed_pages // 2)


def test_finished_sequences_return_their_pages():
    cache, seq = _prefill(_forced_model(), 10_000)
    first_only = int((cache.block_table_LBGM[:, seq[:1]] >= 0).sum())
    total = cache.pool.pages_in_use
    cache.free_sequences(seq[1:])
    assert cache.pool.pages_in_use == first_only < total
    cache.free_sequences(seq[:1])
    assert cache.pool.pages_in_use == 0 and not bool(cache.live_B.any())
    assert int(cache.lengths_LBG.sum()) == 0 and float(cache.ring_w_LBGW.abs().sum()) == 0.0


def test_stream_outgrowing_max_seq_len_is_refused_before_writing():
    model = tiny_model(heads=4, groups=2, dmc=False)
    cache = PagedKVCache(model.cache_config(1000, 1, 8, page_size=PAGE))
    seq = cache.add_sequences(1)
    model.prefill(torch.arange(8)[None], torch.tensor([8]), cache, seq)
    lengths = cache.lengths_LBG.clone()
    with pytest.raises(ValueError, match="max_seq_len"):
        model.decode(torch.tensor([3]), cache, seq)
    assert torch.equal(cache.lengths_LBG, lengths)


def test_cache_and_model_modes_must_agree():
    vanilla_cache = PagedKVCache(tiny_model(dmc=False).cache_config(100, 1, 16))
    seq = vanilla_cache.add_sequences(1)
    with pytest.raises(ValueError, match="vanilla cache cannot serve DMC"):
        tiny_model().prefill(torch.arange(4)[None], torch.tensor([4]), vanilla_cache, seq)
