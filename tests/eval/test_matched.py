"""The matched protocols: every method holds ceil(seen / CR) slots at every chunk boundary,
a dense method equals one full forward, and DMC streams through the same chunks."""

import math

import pytest
import torch

from megatron_dmc.eval.caches import NativeCache
from megatron_dmc.eval.eviction import H2O, TOVA, EvictionCache, kv_budget
from megatron_dmc.eval.matched import (
    matched_continuation_perplexity,
    matched_strided_perplexity,
    stream,
)
from megatron_dmc.eval.perplexity import _windows
from megatron_dmc.eval.slots import slots_held
from megatron_dmc.hf import DMCCache
from tests.eval.helpers import tiny_llama
from tests.eval.test_dmc_path import _tiny_dmc

POLICIES = [H2O, TOVA, lambda compression_ratio: TOVA(compression_ratio, per_layer=False)]


def _full_logprobs(model, ids_T):
    with torch.no_grad():
        return torch.log_softmax(model(ids_T[None], use_cache=False).logits.float(), -1)[0]


class Boundaries:
    """Records (tokens seen, most slots any layer and KV head holds) after every call."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.most: list[int] = []

    def __call__(self, cache, seen: int) -> None:
        self.seen.append(seen)
        self.most.append(int(slots_held(cache).max()))


@pytest.mark.parametrize("make_policy", POLICIES)
@pytest.mark.parametrize("cr", [2.0, 3.0])
def test_eviction_holds_the_budget_at_every_chunk_boundary(make_policy, cr):
    model, ids_T = tiny_llama(), torch.randint(0, 300, (120,))
    policy, caches = make_policy(compression_ratio=cr), []

    def check(cache, seen):
        assert isinstance(cache, EvictionCache) and cache.budget is None
        assert all(layer.keys.shape[2] <= kv_budget(seen, cr) for layer in cache.layers)
        assert all(layer.seen == seen for layer in cache.layers)
        caches.append(int(slots_held(cache).max()))

    result = matched_continuation_perplexity(
        model, policy, ids_T, 48, 12, max_samples=2, chunk=8, on_boundary=check
    )
    assert len(caches) == 2 * math.ceil(60 / 8)
    assert caches[-1] == kv_budget(60, cr)  # the budget is used, not undercut
    assert result.real_cr == pytest.approx(60 / (kv_budget(56, cr) + 4))  # last call: 4 tokens
    per_slot = 2 * 2 * 2 * 16 * 4  # layers * KV heads * (K, V) * head dim * fp32
    assert result.peak_kv_bytes <= (kv_budget(56, cr) + 8) * per_slot
    assert result.kv_bytes == kv_budget(60, cr) * per_slot


def test_dense_matched_protocols_equal_one_full_forward():
    model, ids_T = tiny_llama(), torch.randint(0, 300, (100,))
    result = matched_continuation_perplexity(model, NativeCache(), ids_T, 32, 16, 2, chunk=7)
    nll = 0.0
    for block_T in ids_T[:96].view(2, 48):
        nll -= float(_full_logprobs(model, block_T)[31:47].gather(1, block_T[32:, None]).sum())
    assert result.nll == pytest.approx(nll / 32, rel=1e-5)
    assert result.real_cr == 1.0 and result.protocol == "matched_continuation"

    strided = matched_strided_perplexity(model, NativeCache(), ids_T[:50], 32, 16, chunk=5)
    nll = 0.0
    for begin, end, scored in _windows(50, 32, 16):
        window_T = ids_T[begin:end]
        logprobs_TV = _full_logprobs(model, window_T)[:-1]
        nll -= float(logprobs_TV[-scored:].gather(1, window_T[-scored:, None]).sum())
    assert strided.nll == pytest.approx(nll / 49, rel=1e-5) and strided.real_cr == 1.0


def test_eviction_with_room_for_every_token_is_dense():
    model, ids_T = tiny_llama(), torch.randint(0, 300, (40,))
    dense = stream(model, NativeCache(), ids_T, chunk=6)
    kept = stream(model, H2O(compression_ratio=1.0), ids_T, chunk=6)
    torch.testing.assert_close(kept.logprobs_T, dense.logprobs_T, rtol=0, atol=1e-5)


def test_dmc_streams_through_the_same_chunks():
    model, ids_T, boundaries = _tiny_dmc(), torch.randint(0, 300, (48,)), Boundaries()
    caches = []
    run = stream(model, NativeCache("dmc"), ids_T, 16, lambda c, s: caches.append(c))
    assert all(isinstance(c, DMCCache) for c in caches) and len(caches) == 3
    stream(model, NativeCache("dmc"), ids_T, 16, boundaries)
    assert boundaries.seen == [16, 32, 48]
    counts_LBH = slots_held(caches[-1])
    assert run.slots == pytest.approx(float(counts_LBH.double().mean()))
    assert 1.0 < 48 / run.slots == pytest.approx(caches[-1].compression_ratio())
    expected_T = _full_logprobs(model, ids_T)[:-1].gather(1, ids_T[1:, None])[:, 0]
    torch.testing.assert_close(run.logprobs_T, expected_T, rtol=1e-4, atol=1e-4)


def test_bad_chunk_is_refused():
    with pytest.raises(ValueError, match="chunk"):
        matched_continuation_perplexity(
            tiny_llama(), NativeCache(), torch.arange(60), 32, 16, chunk=0
        )
