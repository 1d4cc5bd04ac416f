"""H2O/TOVA: the cache never holds more than the budget, and equals dense when it fits."""

import pytest
import torch

from megatron_dmc.eval.caches import NativeCache, forward_cached, kv_bytes
from megatron_dmc.eval.eviction import H2O, TOVA, EvictionCache, kv_budget
from megatron_dmc.eval.scoring import prefill, score
from tests.eval.helpers import tiny_llama

POLICIES = [H2O, TOVA, lambda compression_ratio: TOVA(compression_ratio, per_layer=False)]


@pytest.mark.parametrize("make_policy", POLICIES)
@pytest.mark.parametrize("chunk", [1, 5])
def test_cache_never_exceeds_budget(make_policy, chunk):
    model, ids_T = tiny_llama(), torch.randint(0, 300, (48,))
    policy = make_policy(compression_ratio=4.0)
    cache = policy.make_cache(model, 48)
    assert isinstance(cache, EvictionCache) and cache.budget == kv_budget(48, 4.0) == 12
    with torch.no_grad():
        for piece_T in ids_T.split(chunk):
            _, cache = forward_cached(model, piece_T[None], cache)
            assert cache.held_slots() <= 12
            assert all(layer.keys.shape[2] <= 12 for layer in cache.layers)
    per_slot = 2 * 2 * 2 * 16 * 4  # layers * KV heads * (K, V) * head dim * fp32
    assert kv_bytes(cache) == 12 * per_slot
    assert cache.peak_bytes <= (12 + chunk) * per_slot
    assert cache.get_seq_length() == 48


@pytest.mark.parametrize("make_policy", POLICIES)
def test_equals_dense_when_budget_covers_length(make_policy):
    model, ids_T = tiny_llama(), torch.randint(0, 300, (30,))
    dense = score(model, prefill(model, NativeCache(), ids_T[:20]), ids_T[20:])
    evicting = make_policy(compression_ratio=1.0)
    ours = score(model, prefill(model, evicting, ids_T[:20], chunk=3, budget_tokens=30), ids_T[20:])
    torch.testing.assert_close(ours.logprobs_T, dense.logprobs_T, rtol=0, atol=1e-5)


def test_eviction_changes_the_result_and_keeps_recent_tokens():
    model, ids_T = tiny_llama(), torch.randint(0, 300, (40,))
    dense = score(model, prefill(model, NativeCache(), ids_T[:32]), ids_T[32:])
    prefix = prefill(model, H2O(compression_ratio=4.0), ids_T[:32], chunk=4)
    positions_BHS = prefix.cache.layers[0].position_BHS
    assert positions_BHS.shape[-1] == 8
    assert (positions_BHS[..., -4:] == torch.arange(28, 32)).all()  # the recent half
    evicted = score(model, prefix, ids_T[32:])
    assert not torch.allclose(evicted.logprobs_T, dense.logprobs_T, atol=1e-3)


def test_policy_validation():
    with pytest.raises(ValueError, match="compression_ratio"):
        H2O(compression_ratio=0.5)
    with pytest.raises(ValueError, match="recent_fraction"):
        H2O(compression_ratio=2, recent_fraction=1.0)
