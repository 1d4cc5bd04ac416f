"""The whole model with decision heads and/or a merge delay: cached == full forward (fp32)."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_dmc.inference import PagedKVCache, cache_stats
from megatron_dmc.inference.generation import generate
from megatron_dmc.inference.sampling import SamplingConfig
from megatron_dmc.ops import DMCConfig
from tests.inference.model_helpers import tiny_model
from tests.inference.test_model_parity import _cached_logits, _rel_err

CONFIGS = {
    "heads": DMCConfig(window_size=4, decision_source="heads"),
    "delay": DMCConfig(window_size=4, merge_delay=6),
    "heads+delay": DMCConfig(window_size=4, decision_source="heads", merge_delay=6),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_logits_equal_full_forward(name):
    model = tiny_model(CONFIGS[name], heads=4, groups=2)
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    logits, cache = _cached_logits(model, tokens, torch.tensor([40, 31]), 9)
    assert _rel_err(logits[:1, 8:], full[:1, 8:]) <= 1e-5
    assert _rel_err(logits[1:, 8:31], full[1:, 8:31]) <= 1e-5
    stats = cache_stats(cache)
    delay = CONFIGS[name].merge_delay
    assert torch.all(stats.lengths_LBG >= min(delay, 31)), "the exact window counts as slots"
    assert 1.2 < stats.compression_ratio < 4, "decisions should merge some tokens"


@pytest.mark.parametrize("cuts", [(13, 14), (3, 10), (1, 2, 7, 20)])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_extend_in_chunks_equals_full_forward(name, cuts):
    model = tiny_model(CONFIGS[name], heads=4, groups=2, seed=2)
    tokens = torch.randint(0, 97, (1, 36), generator=torch.Generator().manual_seed(2))
    full = model(tokens)
    cache = PagedKVCache(model.cache_config(8, 1, 64, page_size=4, growable=True))
    seq = cache.add_sequences(1)
    bounds = (0, *cuts, 36)
    pieces = [model.extend(tokens[:, a:b], cache, seq) for a, b in itertools.pairwise(bounds)]
    assert _rel_err(torch.cat(pieces, dim=1), full) <= 1e-5


def test_heads_at_zero_init_equal_the_plain_model():
    model = tiny_model(CONFIGS["heads+delay"], heads=4, groups=2, seed=3)
    plain = tiny_model(False, heads=4, groups=2, seed=3)
    with torch.no_grad():
        plain.load_state_dict(model.state_dict(), strict=False)
        for layer in model.model.layers:
            layer.self_attn.dmc_decision_proj.weight.zero_()
    tokens = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(4))
    logits, cache = _cached_logits(model, tokens, torch.tensor([30]), 11)
    assert _rel_err(logits[:, 10:], plain(tokens)[:, 10:]) <= 1e-5
    assert cache_stats(cache).compression_ratio == 1.0


def test_generation_reports_cr_with_the_window():
    model = tiny_model(CONFIGS["heads+delay"], heads=4, groups=2, seed=5)
    result = generate(
        model, [[1, 2, 3, 4, 5, 6, 7, 8, 9], [4, 5]], SamplingConfig(max_new_tokens=12)
    )
    assert all(len(t) == 12 for t in result.tokens)
    slots_floor = 6 * model.shape.num_hidden_layers * model.shape.num_key_value_heads * 2
    assert result.slots_kept >= slots_floor
    assert result.compression_ratio > 1.0
