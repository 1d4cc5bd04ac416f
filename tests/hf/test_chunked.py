"""A multi-token call on a filled DMCCache (the parallel form continued from the cache) equals
Algorithm 1 token by token: same logits, slots, page tables and open-slot state."""

import pytest
import torch

from megatron_dmc.hf import DMCCache
from megatron_dmc.hf.modeling_llama_dmc import chronological
from tests.hf.helpers import dmc_model, fire_decisions, relative_error

IDS = torch.randint(3, 101, (2, 60), generator=torch.Generator().manual_seed(9))
PROMPT, CHUNKS = 11, (1, 25, 2, 14)
"""The prompt, then calls of these lengths (the last one alone is decoded after)."""

MODELS = {
    "window12": dict(),
    "window3": dict(dmc_window_size=3),
    "long_runs": dict(attention_bias=True, dmc_window_size=4),
}


def _model(name: str):
    overrides = MODELS[name]
    merge_bias = 8.0 if overrides.get("attention_bias") else None
    return fire_decisions(dmc_model(**overrides), merge_bias=merge_bias)


def _run(model, cache, ids, call_lengths, attention_mask=None):
    logits, start = [], 0
    with torch.no_grad():
        for length in call_lengths:
            mask = attention_mask if start == 0 else None
            piece = ids[:, start : start + length]
            logits.append(model(piece, attention_mask=mask, cache=cache, use_cache=True).logits)
            start += length
    return torch.cat(logits, dim=1)


def _sequential(length: int) -> list[int]:
    return [PROMPT] + [1] * (length - PROMPT)


def _chunked() -> list[int]:
    return [PROMPT, *CHUNKS, *[1] * (IDS.shape[1] - PROMPT - sum(CHUNKS))]


def _assert_same_state(chunked: DMCCache, sequential: DMCCache) -> None:
    assert torch.equal(chunked.slot_counts(), sequential.slot_counts())
    for a, b in zip(chunked.layers, sequential.layers, strict=True):
        keys_a, values_a, valid_a = a.slots.gather()
        keys_b, values_b, valid_b = b.slots.gather()
        assert torch.equal(valid_a, valid_b)
        assert torch.equal(a.slots.pages_UM >= 0, b.slots.pages_UM >= 0)
        assert a.slots.used_pages == b.slots.used_pages
        assert relative_error(keys_a[valid_a], keys_b[valid_b]) <= 1e-5
        assert relative_error(values_a[valid_a], values_b[valid_b]) <= 1e-5
        held_a, held_b = chronological(a.window), chronological(b.window)
        assert torch.equal(held_a.run_len_BG, held_b.run_len_BG)
        for name in ("k_BGWD", "v_BGWD", "w_BGW"):
            weighted_a = getattr(held_a, name) * (held_a.w_BGW[..., None] if "D" in name else 1)
            weighted_b = getattr(held_b, name) * (held_b.w_BGW[..., None] if "D" in name else 1)
            assert relative_error(weighted_a, weighted_b) <= 1e-5


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_chunks_equal_token_by_token(name, page_size):
    model = _model(name)
    chunked, sequential = (DMCCache(model.config, page_size=page_size) for _ in range(2))
    logits = _run(model, chunked, IDS, _chunked())
    expected = _run(model, sequential, IDS, _sequential(IDS.shape[1]))
    assert relative_error(logits, expected) <= 1e-5
    _assert_same_state(chunked, sequential)
    counts = chunked.slot_counts()
    assert (counts < IDS.shape[1]).any() and (counts > 1).all(), "merges and appends occur"


def test_chunks_equal_the_forward_without_cache():
    model = _model("long_runs")
    logits = _run(model, DMCCache(model.config, page_size=4), IDS, _chunked())
    with torch.no_grad():
        expected = model(IDS, use_cache=False).logits
    assert relative_error(logits, expected) <= 1e-5


def test_chunk_after_a_left_padded_prompt():
    model = _model("window3")
    ids, mask = IDS.clone(), torch.ones(2, PROMPT, dtype=torch.long)
    ids[0, :4], mask[0, :4] = model.config.pad_token_id, 0
    chunked, sequential = DMCCache(model.config), DMCCache(model.config)
    logits = _run(model, chunked, ids, _chunked(), mask)
    expected = _run(model, sequential, ids, _sequential(ids.shape[1]), mask)
    assert relative_error(logits, expected) <= 1e-5
    _assert_same_state(chunked, sequential)
    assert torch.equal(chunked.real_tokens(), torch.tensor([ids.shape[1] - 4, ids.shape[1]]))
