"""generate() with the compressed DMCCache equals step-by-step full forwards, exactly in fp32."""

import pytest
import torch

from megatron_dmc.hf import DMCCache
from tests.hf.helpers import dmc_model, fire_decisions, relative_error

PROMPT = torch.randint(3, 101, (2, 17), generator=torch.Generator().manual_seed(5))


def greedy_by_full_forward(model, ids, steps, attention_mask=None):
    """The reference: no cache, the whole sequence re-run for every new token."""
    all_logits = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, attention_mask=attention_mask, use_cache=False).logits[:, -1]
        all_logits.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
    return ids, torch.stack(all_logits, dim=1)


def generate(model, ids, steps, **kwargs):
    out = model.generate(
        ids,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(dmc_window_size=3), dict(attention_bias=True, dmc_window_size=3)],
    ids=["window12", "window3", "long_runs"],
)
def test_generate_equals_full_forward(overrides):
    model = dmc_model(**overrides)
    merge_bias = 8.0 if overrides.get("attention_bias") else None
    fire_decisions(model, merge_bias=merge_bias)
    sequences, logits = generate(model, PROMPT, 12)
    expected_sequences, expected_logits = greedy_by_full_forward(model, PROMPT, 12)
    assert torch.equal(sequences, expected_sequences)
    assert relative_error(logits, expected_logits) <= 1e-5


def test_left_padded_batch_equals_unpadded_rows():
    model = fire_decisions(dmc_model())
    ids = PROMPT.clone()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    ids[0, :5] = model.config.pad_token_id
    sequences, logits = generate(model, ids, 8, attention_mask=mask)
    for row, start in ((0, 5), (1, 0)):
        row_sequences, row_logits = greedy_by_full_forward(model, PROMPT[row : row + 1, start:], 8)
        assert torch.equal(sequences[row, start:], row_sequences[0])
        assert relative_error(logits[row], row_logits[0]) <= 1e-5


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_prompt_in_chunks_then_decode_equals_full_forward(page_size):
    model = fire_decisions(dmc_model(dmc_window_size=4))
    cache = DMCCache(model.config, page_size=page_size)
    pieces = [PROMPT[:, :9], PROMPT[:, 9:14], PROMPT[:, 14:15], PROMPT[:, 15:]]
    with torch.no_grad():
        logits = torch.cat(
            [model(piece, cache=cache, use_cache=True).logits for piece in pieces], 1
        )
        expected = model(PROMPT, use_cache=False).logits
    assert relative_error(logits, expected) <= 1e-5
    assert cache.get_seq_length() == PROMPT.shape[1]


def test_sampling_runs_with_the_dmc_cache():
    model = fire_decisions(dmc_model())
    torch.manual_seed(0)
    out = model.generate(PROMPT, max_new_tokens=5, do_sample=True, top_k=5)
    assert out.shape == (2, PROMPT.shape[1] + 5)
