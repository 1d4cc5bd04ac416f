"""vanilla, DMC and GQA evaluate through the paged engine: same numbers as transformers."""

import copy

import pytest
import torch

from megatron_dmc.eval.caches import EngineCache, NativeCache, PagedEngine
from megatron_dmc.eval.methods import build_method
from megatron_dmc.eval.perplexity import continuation_perplexity, strided_perplexity
from megatron_dmc.eval.scoring import greedy_generate, prefill, score
from megatron_dmc.hf import DMCLlamaForCausalLM, LlamaDMCConfig
from tests.eval.helpers import tiny_llama
from tests.eval.test_dmc_path import _tiny_dmc


def test_continuation_through_engine_equals_eval_forward_and_dmc_cache():
    model, ids_T = _tiny_dmc(), torch.randint(0, 300, (48,))
    engine_cache = prefill(model, PagedEngine("dmc"), ids_T[:32]).cache
    assert isinstance(engine_cache, EngineCache)
    hf_cache = prefill(model, NativeCache("dmc"), ids_T[:32]).cache
    assert torch.equal(engine_cache.slot_counts(), hf_cache.slot_counts())
    assert int(engine_cache.slot_counts().sum()) < 32 * 2 * 2  # some tokens merged
    result = continuation_perplexity(model, PagedEngine("dmc"), ids_T, 32, 16)
    with torch.no_grad():
        logits = model(ids_T[None], use_cache=False).logits.float()
    logprobs_TV = torch.log_softmax(logits[0], -1)[31:47]
    expected = -float(logprobs_TV.gather(1, ids_T[32:, None]).mean())
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.kv_bytes > 0


@pytest.mark.parametrize(("prefill_chunk", "score_chunk"), [(8, None), (5, 1), (None, 3)])
def test_engine_chunked_calls_score_like_one_pass(prefill_chunk, score_chunk):
    model, ids_T = _tiny_dmc(), torch.randint(0, 300, (48,))
    one = continuation_perplexity(model, PagedEngine("dmc"), ids_T, 32, 16)
    chunked = continuation_perplexity(
        model, PagedEngine("dmc"), ids_T, 32, 16, prefill_chunk, score_chunk
    )
    assert chunked.nll == pytest.approx(one.nll, rel=1e-5)


def test_engine_strided_equals_transformers_dmc_cache():
    model, ids_T = _tiny_dmc(), torch.randint(0, 300, (50,))
    engine = strided_perplexity(model, PagedEngine("dmc"), ids_T, window=32, stride=16, chunk=7)
    hf = strided_perplexity(model, NativeCache("dmc"), ids_T, window=32, stride=16, chunk=1)
    assert engine.nll == pytest.approx(hf.nll, rel=1e-5)
    assert engine.tokens == hf.tokens == 49


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_vanilla_and_gqa_through_engine_equal_dynamic_cache(kv_heads):
    model, ids_T = tiny_llama(kv_heads=kv_heads), torch.randint(0, 300, (68,))
    engine = continuation_perplexity(model, build_method("vanilla"), ids_T, 48, 20, score_chunk=6)
    hf = continuation_perplexity(model, NativeCache(), ids_T, 48, 20)
    assert engine.nll == pytest.approx(hf.nll, rel=1e-5)
    assert engine.kv_bytes == hf.kv_bytes  # 48 tokens: whole pages, no window state


def test_greedy_generation_and_copied_prefix_match_transformers():
    model, ids_T = _tiny_dmc(), torch.randint(0, 300, (24,))
    never = lambda tokens: False  # noqa: E731
    engine_prefix = prefill(model, PagedEngine("dmc"), ids_T, chunk=10)
    hf_prefix = prefill(model, NativeCache("dmc"), ids_T)
    twin = copy.deepcopy(engine_prefix)
    tokens = greedy_generate(model, engine_prefix, 12, never)
    assert tokens == greedy_generate(model, hf_prefix, 12, never)
    assert twin.cache.engine is engine_prefix.cache.engine  # weights are shared, not copied
    scored = score(model, twin, torch.tensor(tokens))
    assert bool(scored.greedy_T.all())


def test_dmc_method_refuses_a_plain_llama():
    with pytest.raises(ValueError, match="plain Llama"):
        prefill(tiny_llama(), build_method("dmc"), torch.arange(8))


def test_engine_cache_holds_one_sequence():
    cache = PagedEngine("vanilla").make_cache(tiny_llama(), 8)
    with pytest.raises(ValueError, match="one sequence"):
        cache.forward(torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("fields", [dict(dmc_decision_source="heads"), dict(dmc_merge_delay=6)])
def test_heads_and_delay_models_evaluate_like_the_transformers_cache(fields):
    torch.manual_seed(0)
    config = LlamaDMCConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **fields,
    )
    model = DMCLlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if "dmc_decision_source" in fields:
                layer.self_attn.dmc_decision_proj.weight.normal_(0.0, 0.0075)
            else:
                layer.self_attn.k_proj.weight.view(2, 16, 64)[:, -1] *= 300
    ids_T = torch.randint(0, 300, (60,))
    engine = strided_perplexity(model, PagedEngine("dmc"), ids_T, window=40, stride=20, chunk=9)
    hf = strided_perplexity(model, NativeCache("dmc"), ids_T, window=40, stride=20, chunk=9)
    assert engine.nll == pytest.approx(hf.nll, rel=1e-5)
    cache = prefill(model, PagedEngine("dmc"), ids_T[:40], chunk=11).cache
    hf_cache = prefill(model, NativeCache("dmc"), ids_T[:40], chunk=11).cache
    assert torch.equal(cache.slot_counts(), hf_cache.slot_counts())
    assert int(cache.slot_counts().sum()) < 0.9 * 40 * 2 * 2  # decisions really merged


def test_matched_streaming_through_the_engine():
    from megatron_dmc.eval.matched import stream

    model, ids_T = _tiny_dmc(), torch.randint(0, 300, (48,))
    caches = []
    run = stream(model, PagedEngine("dmc"), ids_T, 16, lambda c, s: caches.append(c))
    hf = stream(model, NativeCache("dmc"), ids_T, 16)
    torch.testing.assert_close(run.logprobs_T, hf.logprobs_T, rtol=1e-5, atol=1e-5)
    assert run.slots == pytest.approx(hf.slots)
    assert 1.0 < 48 / run.slots == pytest.approx(caches[-1].compression_ratio())
