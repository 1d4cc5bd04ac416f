"""DMS (kv_method="dms") in the paged engine: cached decode == full forward (fp32), and an
evicted token's slot is reused, so a stream holds exactly its kept tokens in dense pages."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_dmc.inference import PagedKVCache, cache_stats
from megatron_dmc.ops import dms_config
from tests.inference.model_helpers import tiny_model
from tests.inference.test_model_parity import _cached_logits, _rel_err


@pytest.mark.parametrize("source", ["heads", "query"])
@pytest.mark.parametrize("window", [0, 6])
def test_decode_logits_equal_full_forward(window, source):
    model = tiny_model(dms_config(window, decision_source=source), heads=4, groups=2)
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    logits, cache = _cached_logits(model, tokens, torch.tensor([40, 31]), 9)
    assert _rel_err(logits[:1, 8:], full[:1, 8:]) <= 1e-5
    assert _rel_err(logits[1:, 8:31], full[1:, 8:31]) <= 1e-5
    stats = cache_stats(cache)
    assert torch.all(stats.lengths_LBG >= min(window, 31)), "the window counts as slots"
    assert stats.compression_ratio > 1.2, "decisions should evict some tokens"


@pytest.mark.parametrize("source", ["heads", "query"])
@pytest.mark.parametrize("cuts", [(13, 14), (1, 2, 7, 20)])
def test_extend_in_chunks_equals_full_forward(cuts, source):
    model = tiny_model(dms_config(5, decision_source=source), heads=4, groups=2, seed=2)
    tokens = torch.randint(0, 97, (1, 36), generator=torch.Generator().manual_seed(2))
    full = model(tokens)
    cache = PagedKVCache(model.cache_config(8, 1, 64, page_size=4, growable=True))
    seq = cache.add_sequences(1)
    bounds = (0, *cuts, 36)
    pieces = [model.extend(tokens[:, a:b], cache, seq) for a, b in itertools.pairwise(bounds)]
    assert _rel_err(torch.cat(pieces, dim=1), full) <= 1e-5


@pytest.mark.parametrize("source", ["heads", "query"])
def test_evicted_slots_are_reused_and_pages_stay_dense(source):
    model = tiny_model(dms_config(0, decision_source=source), heads=4, groups=2, seed=3)
    tokens = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(3))
    _, cache = _cached_logits(model, tokens, torch.tensor([60]), 5)
    lengths_LBG = cache.lengths_LBG[:, :1]
    assert (lengths_LBG < 60).all(), "every stream should have evicted something"
    pages_LBG = (cache.block_table_LBGM[:, :1] >= 0).sum(-1)
    page = cache.config.page_size
    assert torch.equal(pages_LBG, (lengths_LBG + page - 1) // page)


def test_query_neuron_model_has_no_decision_heads_and_reads_q():
    model = tiny_model(dms_config(3, decision_source="query"), heads=4, groups=2, seed=4)
    assert not any("dmc_decision_proj" in name for name, _ in model.named_parameters())
    tokens = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(4))
    before = model(tokens)
    with torch.no_grad():  # the neuron at 0: logit -c, nothing evicted
        for layer in model.model.layers:
            q_rows = layer.self_attn.q_proj.weight.view(4, model.shape.head_dim, -1)
            q_rows[::2, -1] = 0.0
    logits, cache = _cached_logits(model, tokens, torch.tensor([24]), 5)
    assert _rel_err(logits[:, 4:], model(tokens)[:, 4:]) <= 1e-5
    assert torch.all(cache_stats(cache).lengths_LBG == 24), "the window counts as slots"
    assert _rel_err(model(tokens), before) > 1e-3
