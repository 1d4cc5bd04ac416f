"""Decision heads (dmc_decision_source="heads") and delayed merging (dmc_merge_delay) in the
transformers model and its cache, against megatron_dmc.ops and a plain Llama."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_dmc.hf import DMCCache, DMCLlamaForCausalLM
from tests.hf.helpers import (
    dmc_model,
    fire_decisions,
    fire_heads,
    reference_llama,
    relative_error,
    tiny_config,
)

IDS = torch.randint(3, 101, (2, 40), generator=torch.Generator().manual_seed(12))
PROMPT, CHUNKS = 7, (1, 9, 2, 5)
"""The prompt, then calls of these lengths, then one token at a time."""


def plain_llama(model: DMCLlamaForCausalLM) -> LlamaForCausalLM:
    fields = {k: v for k, v in model.config.to_dict().items() if not k.startswith("dmc_")}
    fields.pop("model_type"), fields.pop("architectures", None)
    plain = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    state = {k: v for k, v in model.state_dict().items() if "dmc_decision_proj" not in k}
    plain.load_state_dict(state)
    return plain


def fired(source: str, delay: int = 0, **overrides) -> DMCLlamaForCausalLM:
    model = dmc_model(dmc_decision_source=source, dmc_merge_delay=delay, **overrides)
    return fire_heads(model) if source == "heads" else fire_decisions(model)


def run_cached(model, ids, call_lengths, cache=None):
    cache = cache or DMCCache(model.config, page_size=3)
    logits, start = [], 0
    with torch.no_grad():
        for length in call_lengths:
            piece = ids[:, start : start + length]
            logits.append(model(piece, cache=cache, use_cache=True).logits)
            start += length
    return torch.cat(logits, dim=1), cache


def calls(length: int, chunked: bool) -> list[int]:
    head = [PROMPT, *CHUNKS] if chunked else [PROMPT]
    return head + [1] * (length - sum(head))


def test_heads_model_at_init_is_the_original_llama():
    model = dmc_model(dmc_decision_source="heads")
    assert all(not layer.self_attn.dmc_decision_proj.weight.any() for layer in model.model.layers)
    plain = plain_llama(model)
    with torch.no_grad():
        expected = plain(IDS).logits
        assert relative_error(model(IDS, use_cache=False).logits, expected) <= 1e-6
    cached, cache = run_cached(model, IDS, calls(IDS.shape[1], chunked=True))
    assert relative_error(cached, expected) <= 1e-6
    assert torch.equal(cache.slot_counts(), torch.full((2, 2, 2), IDS.shape[1]))


def test_plain_llama_checkpoint_loads_with_zero_heads(tmp_path):
    model = dmc_model(dmc_decision_source="heads")
    plain_llama(fire_heads(model)).save_pretrained(tmp_path)
    loaded = DMCLlamaForCausalLM.from_pretrained(tmp_path, dmc_decision_source="heads").eval()
    weights = [layer.self_attn.dmc_decision_proj.weight for layer in loaded.model.layers]
    assert all(not weight.any() for weight in weights)
    with torch.no_grad():
        assert relative_error(loaded(IDS).logits, plain_llama(loaded)(IDS).logits) <= 1e-6


@pytest.mark.parametrize("delay", [0, 1, 5])
@pytest.mark.parametrize("source", ["channel", "heads"])
def test_forward_equals_the_ops_sequential_reference(source, delay):
    model = fired(source, delay)
    reference = reference_llama(model, "sequential")
    ids = IDS[:, :24]
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        expected = reference(ids).logits
    assert relative_error(logits, expected) <= 1e-5
    _, cache = run_cached(model, ids, calls(ids.shape[1], chunked=True))
    lengths = torch.stack([layer.self_attn.lengths for layer in reference.model.layers])
    assert torch.equal(cache.slot_counts(), lengths)
    assert (lengths < ids.shape[1]).any() and (lengths > delay + 1).all(), "merges and appends"


@pytest.mark.parametrize("delay", [0, 4, 12])
@pytest.mark.parametrize("source", ["channel", "heads"])
@pytest.mark.parametrize("chunked", [False, True])
def test_cached_decode_equals_the_full_forward(source, delay, chunked):
    model = fired(source, delay)
    with torch.no_grad():
        expected = model(IDS, use_cache=False).logits
    reference = reference_llama(model, "ops")
    with torch.no_grad():
        reference(IDS)
    alpha = torch.cat([layer.self_attn.decisions.alpha_BGT for layer in reference.model.layers])
    assert 0.15 < float(alpha.mean()) < 0.7, "both appends and merges must occur"
    logits, cache = run_cached(model, IDS, calls(IDS.shape[1], chunked))
    assert relative_error(logits, expected) <= 1e-5
    kept = IDS.shape[1] - alpha[..., : IDS.shape[1] - delay].sum(-1)  # the delayed ones count
    assert torch.equal(cache.slot_counts(), kept.view(2, 2, 2).long())


def test_decision_heads_get_gradients_in_training_mode():
    model = fired("heads", 2).train()
    model(IDS[:, :16]).logits.square().mean().backward()
    for layer in model.model.layers:
        assert layer.self_attn.dmc_decision_proj.weight.grad.abs().sum() > 0


def test_delay_with_heads_generates_like_the_forward():
    model = fired("heads", 3)
    out = model.generate(IDS[:, :10], max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        steps = model(out[:, :-1], use_cache=False).logits[:, 9:].argmax(-1)
    assert torch.equal(out[:, 10:], steps)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(dmc_decision_source="both"), "dmc_decision_source must be one of"),
        (dict(dmc_merge_delay=-1), "dmc_merge_delay must be an integer >= 0"),
    ],
)
def test_config_refusals(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_left_padding_with_a_delay_is_refused():
    model = dmc_model(dmc_merge_delay=2)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="left padding is not supported with dmc_merge_delay"):
        model(IDS[:, :9], attention_mask=mask)
