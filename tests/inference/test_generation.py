"""Generation: greedy == argmax of the full forward, ragged batches, EOS, sampling, bad input."""

from __future__ import annotations

import pytest
import torch

from megatron_dmc.inference import CacheFullError
from megatron_dmc.inference.generation import generate
from megatron_dmc.inference.sampling import SamplingConfig, next_tokens
from tests.inference.model_helpers import tiny_model

PROMPTS = [[5, 17, 3, 44, 9, 12, 80, 2, 31], [7, 8], [60, 61, 62, 63, 1]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(heads=4, groups=2)


def test_greedy_tokens_are_argmax_of_full_forward(model):
    result = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12), page_size=4, chunk_size=4)
    for prompt, new in zip(PROMPTS, result.tokens):
        logits = model(torch.tensor([prompt + new]))[0]
        assert new == logits[len(prompt) - 1 : -1].argmax(-1).tolist()
    assert result.finish_reasons == ["length"] * 3
    assert result.compression_ratio > 1.1


def test_ragged_batch_equals_prompts_alone(model):
    batch = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8), page_size=4)
    for prompt, new in zip(PROMPTS, batch.tokens):
        assert generate(model, [prompt], SamplingConfig(max_new_tokens=8)).tokens[0] == new


def test_eos_stops_only_that_sequence(model):
    free_run = generate(model, PROMPTS, SamplingConfig(max_new_tokens=6))
    eos = free_run.tokens[0][2]
    result = generate(model, PROMPTS, SamplingConfig(max_new_tokens=6, eos_token_ids=(eos,)))
    assert result.tokens[0] == free_run.tokens[0][:3]
    assert result.finish_reasons[0] == "eos"
    for b in (1, 2):
        stop = free_run.tokens[b].index(eos) + 1 if eos in free_run.tokens[b] else 6
        assert result.tokens[b] == free_run.tokens[b][:stop]


def test_sampling_degenerates_to_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)
    gen = torch.Generator().manual_seed(1)
    for config in (
        SamplingConfig(temperature=1.0, top_k=1),
        SamplingConfig(temperature=2.0, top_p=1e-6),
    ):
        assert torch.equal(next_tokens(logits, config, gen), greedy)
    spread = next_tokens(logits.repeat(64, 1), SamplingConfig(temperature=1.0, top_k=5), gen)
    allowed = logits.topk(5, dim=-1).indices.repeat(64, 1)
    assert bool((spread[:, None] == allowed).any(-1).all())
    assert len(set(spread.tolist())) > 4


def test_prompt_longer_than_max_positions_is_refused(model):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [[1] * 250], SamplingConfig(max_new_tokens=10))


def test_pool_exhausted_in_prefill_raises_and_frees_everything(model):
    with pytest.raises(CacheFullError, match="pool exhausted"):
        generate(model, PROMPTS, SamplingConfig(max_new_tokens=4), page_size=2, num_pages=6)


def test_pool_exhausted_in_decode_preempts_without_corrupting_others(model):
    free_run = generate(model, PROMPTS, SamplingConfig(max_new_tokens=40), page_size=2)
    tight = generate(model, PROMPTS, SamplingConfig(max_new_tokens=40), page_size=2, num_pages=70)
    assert "cache_full" in tight.finish_reasons
    for b, reason in enumerate(tight.finish_reasons):
        expected = free_run.tokens[b]
        assert tight.tokens[b] == (
            expected[: len(tight.tokens[b])] if reason == "cache_full" else expected
        )
