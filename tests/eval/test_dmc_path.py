"""A DMC Llama goes through the same protocol code with its compressed cache."""

import pytest
import torch

from megatron_dmc.eval.caches import NativeCache
from megatron_dmc.eval.perplexity import continuation_perplexity, strided_perplexity
from megatron_dmc.eval.scoring import prefill
from megatron_dmc.hf import DMCCache, DMCLlamaForCausalLM, LlamaDMCConfig


def _tiny_dmc() -> DMCLlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaDMCConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = DMCLlamaForCausalLM(config).eval()
    with torch.no_grad():  # a large decision channel makes some keys merge
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.view(2, 16, 64)[:, -1] *= 300
    return model


def test_continuation_through_dmc_cache_equals_eval_forward():
    model, ids_T = _tiny_dmc(), torch.randint(0, 300, (48,))
    assert isinstance(prefill(model, NativeCache("dmc"), ids_T[:32]).cache, DMCCache)
    result = continuation_perplexity(model, NativeCache("dmc"), ids_T, 32, 16)
    with torch.no_grad():
        logits = model(ids_T[None], use_cache=False).logits.float()
    logprobs_TV = torch.log_softmax(logits[0], -1)[31:47]
    expected = -float(logprobs_TV.gather(1, ids_T[32:, None]).mean())
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.kv_bytes > 0


@pytest.mark.parametrize(("prefill_chunk", "score_chunk"), [(8, None), (5, 1), (None, 3)])
def test_chunked_calls_score_like_one_pass(prefill_chunk, score_chunk):
    model, ids_T = _tiny_dmc(), torch.randint(0, 300, (48,))
    one = continuation_perplexity(model, NativeCache("dmc"), ids_T, 32, 16)
    chunked = continuation_perplexity(
        model,
        NativeCache("dmc"),
        ids_T,
        32,
        16,
        prefill_chunk=prefill_chunk,
        score_chunk=score_chunk,
    )
    assert chunked.nll == pytest.approx(one.nll, rel=1e-5)


def test_strided_through_dmc_cache_equals_token_by_token():
    model, ids_T = _tiny_dmc(), torch.randint(0, 300, (50,))
    chunked = strided_perplexity(model, NativeCache("dmc"), ids_T, window=32, stride=16, chunk=7)
    stepped = strided_perplexity(model, NativeCache("dmc"), ids_T, window=32, stride=16, chunk=1)
    assert chunked.nll == pytest.approx(stepped.nll, rel=1e-5)
    assert chunked.tokens == stepped.tokens == 49
