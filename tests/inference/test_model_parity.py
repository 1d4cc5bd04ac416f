"""The whole model: cached prefill + decode == the full eval-mode forward (fp32)."""

from __future__ import annotations

import pytest
import torch

from megatron_dmc.inference import PagedKVCache, cache_stats
from tests.inference.model_helpers import tiny_model


def _rel_err(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max())


def _cached_logits(
    model, tokens_BT, lengths_B, prefill_len, chunk=None, backend="padded", page_size=4
):
    """Logits [B, T, V] from prefill of the first tokens, then teacher-forced decode."""
    batch, length = tokens_BT.shape
    groups = model.shape.num_key_value_heads
    pages = model.shape.num_hidden_layers * batch * groups * (-(-length // page_size))
    cache = PagedKVCache(model.cache_config(pages, batch, length, page_size=page_size))
    seq = cache.add_sequences(batch)
    prompt_B = lengths_B.clamp(max=prefill_len)
    logits = torch.zeros(batch, length, model.shape.vocab_size)
    last = model.prefill(tokens_BT[:, :prefill_len], prompt_B, cache, seq, chunk)
    logits[torch.arange(batch), prompt_B - 1] = last
    for t in range(prefill_len, length):
        live = (lengths_B > t).nonzero().flatten()
        logits[live, t] = model.decode(tokens_BT[live, t], cache, seq[live], backend)
    return logits, cache


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("backend", ["reference", "padded"])
def test_decode_logits_equal_full_forward(heads, groups, backend):
    model = tiny_model(heads=heads, groups=groups)
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    logits, cache = _cached_logits(model, tokens, torch.tensor([40, 40]), 9, backend=backend)
    assert _rel_err(logits[:, 8:], full[:, 8:]) <= 1e-5
    stats = cache_stats(cache)
    assert 1.2 < stats.compression_ratio < 4, "the decision channel should fire on some tokens"


def test_chunked_prefill_logits_equal_full_forward():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(2))
    full = model(tokens)
    logits, _ = _cached_logits(model, tokens, torch.tensor([37, 37]), 30, chunk=7)
    assert _rel_err(logits[:, 29:], full[:, 29:]) <= 1e-5


def test_ragged_batch_equals_each_sequence_alone():
    model = tiny_model(heads=4, groups=2)
    tokens = torch.randint(0, 97, (3, 33), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([33, 20, 6])
    logits, _ = _cached_logits(model, tokens, lengths, 12, chunk=5, page_size=3)
    for b, n in enumerate(lengths.tolist()):
        full = model(tokens[b : b + 1, :n])[0]
        first = min(12, n) - 1
        assert _rel_err(logits[b, first:n], full[first:]) <= 1e-5


def test_vanilla_mode_equals_full_forward_and_stores_every_token():
    model = tiny_model(dmc=False)
    tokens = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(4))
    full = model(tokens)
    logits, cache = _cached_logits(model, tokens, torch.tensor([30, 30]), 10)
    assert _rel_err(logits[:, 9:], full[:, 9:]) <= 1e-5
    assert cache_stats(cache).compression_ratio == 1.0
