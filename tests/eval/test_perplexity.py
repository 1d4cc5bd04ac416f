"""Perplexity protocols against hand computations with one full forward."""

import math

import pytest
import torch

from megatron_dmc.eval.caches import NativeCache
from megatron_dmc.eval.eviction import H2O, TOVA, kv_budget
from megatron_dmc.eval.perplexity import _windows, continuation_perplexity, strided_perplexity
from megatron_dmc.eval.scoring import prefill, score
from tests.eval.helpers import tiny_llama


def _full_logprobs(model, ids_T):
    with torch.no_grad():
        return torch.log_softmax(model(ids_T[None]).logits.float(), -1)[0]


def test_continuation_equals_one_full_forward():
    model, ids_T = tiny_llama(), torch.randint(0, 300, (100,))
    result = continuation_perplexity(model, NativeCache(), ids_T, 32, 16, max_samples=2)
    nll = 0.0
    for block_T in ids_T[:96].view(2, 48):
        logprobs_TV = _full_logprobs(model, block_T)
        nll -= float(logprobs_TV[31:47].gather(1, block_T[32:, None]).sum())
    assert result.tokens == 32
    assert result.nll == pytest.approx(nll / 32, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / 32), rel=1e-5)
    assert result.kv_bytes == result.dense_kv_bytes == 32 * 2 * 2 * 2 * 16 * 4


@pytest.mark.parametrize("score_chunk", [1, 5])
def test_continuation_token_by_token_equals_one_pass(score_chunk):
    model, ids_T = tiny_llama(), torch.randint(0, 300, (48,))
    one = continuation_perplexity(model, NativeCache(), ids_T, 32, 16)
    stepped = continuation_perplexity(model, NativeCache(), ids_T, 32, 16, score_chunk=score_chunk)
    assert stepped.nll == pytest.approx(one.nll, rel=1e-5)


def test_strided_matches_hand_computation():
    model, ids_T = tiny_llama(), torch.randint(0, 300, (50,))
    result = strided_perplexity(model, NativeCache(), ids_T, window=32, stride=16, chunk=7)
    assert _windows(50, 32, 16) == [(0, 32, 31), (16, 48, 16), (32, 50, 2)]
    nll = 0.0
    for begin, end, scored in _windows(50, 32, 16):
        window_T = ids_T[begin:end]
        logprobs_TV = _full_logprobs(model, window_T)[:-1]
        nll -= float(logprobs_TV[-scored:].gather(1, window_T[-scored:, None]).sum())
    assert result.tokens == 49
    assert result.nll == pytest.approx(nll / 49, rel=1e-5)


def test_budgeted_method_holds_less():
    model, ids_T = tiny_llama(), torch.randint(0, 300, (96,))
    result = continuation_perplexity(model, H2O(compression_ratio=2.0), ids_T, 64, 32)
    assert result.kv_bytes * 2 == result.dense_kv_bytes
    assert math.isfinite(result.nll)


def test_too_little_text_is_a_clear_error():
    with pytest.raises(ValueError, match="held-out tokens"):
        continuation_perplexity(tiny_llama(), NativeCache(), torch.arange(10), 32, 16)


def _today_continuation(model, method, ids_T, context_len, continuation_len):
    """The continuation protocol as the scoring functions compose it, written out."""
    nll, peak = 0.0, 0
    for block_T in ids_T.view(-1, context_len + continuation_len):
        prefix = prefill(model, method, block_T[:context_len])
        scored = score(model, prefix, block_T[context_len:])
        nll, peak = nll - float(scored.logprobs_T.sum()), max(peak, scored.peak_kv_bytes)
    return nll, peak


@pytest.mark.parametrize("method", [NativeCache(), H2O(compression_ratio=2.0), TOVA(4.0)])
def test_unmatched_protocols_reproduce_the_scoring_path_exactly(method):
    model, ids_T = tiny_llama(), torch.randint(0, 300, (96,))
    result = continuation_perplexity(model, method, ids_T, 32, 16)
    nll, peak = _today_continuation(model, method, ids_T, 32, 16)
    assert result.nll == nll / 32 and result.peak_kv_bytes == peak
    budget = 32 if method.compression_ratio == 1 else kv_budget(32, method.compression_ratio)
    assert result.real_cr == pytest.approx(48 / (budget + 16))  # the continuation held exactly

    strided = strided_perplexity(model, method, ids_T[:50], 32, 16, chunk=5)
    expected = 0.0
    for begin, end, scored_len in _windows(50, 32, 16):
        prefix = prefill(model, method, ids_T[begin : begin + 1], budget_tokens=32)
        expected -= float(
            score(model, prefix, ids_T[begin + 1 : end], 5).logprobs_T[-scored_len:].sum()
        )
    assert strided.nll == expected / 49
