"""DMS (dmc_kv_method="dms") in the transformers model and its paged cache: the full forward
equals token-by-token eviction (`ops.dms_sequential_reference`) and cached decode equals the
full forward; an evicted token's slot is reused, so a head holds exactly its kept tokens."""

import types

import pytest
import torch

from megatron_dmc.ops import decision_head_logits, dms_config, dms_sequential_reference
from tests.hf.helpers import dmc_model, fire_heads, reference_llama, relative_error, tiny_config
from tests.hf.test_heads_and_delay import IDS, calls, run_cached


def dms_model(window: int, source: str = "heads"):
    model = dmc_model(
        dmc_decision_source=source, dmc_merge_delay=window, dmc_window_size=1, dmc_kv_method="dms"
    )
    if source == "query":  # the untouched query neuron: logits 100 q - 5 of both signs
        assert not any("dmc_decision_proj" in name for name, _ in model.named_parameters())
        return model
    return fire_heads(model)


def _dms_forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q, k, v = (
        proj(hidden_states).view(shape).transpose(1, 2)
        for proj in (self.q_proj, self.k_proj, self.v_proj)
    )
    cos, sin = position_embeddings
    logits = None
    if self.dmc_config.uses_heads:
        logits = decision_head_logits(hidden_states, self.dmc_weight, self.dmc_config.init_val)
    out, self.lengths = dms_sequential_reference(q, k, v, cos[0], sin[0], self.dmc_config, logits)
    return self.o_proj(out.transpose(1, 2).flatten(2)), None


def sequential_dms_llama(model):
    reference = reference_llama(model, "sequential")
    for layer in reference.model.layers:
        attention = layer.self_attn
        config = model.config
        attention.dmc_config = dms_config(
            config.dmc_merge_delay, decision_source=config.dmc_decision_source
        )
        attention.forward = types.MethodType(_dms_forward, attention)
    return reference


@pytest.mark.parametrize("source", ["heads", "query"])
@pytest.mark.parametrize("window", [0, 3])
def test_forward_equals_token_by_token_eviction(window, source):
    model = dms_model(window, source)
    reference = sequential_dms_llama(model)
    ids = IDS[:, :24]
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        expected = reference(ids).logits
    assert relative_error(logits, expected) <= 1e-5
    _, cache = run_cached(model, ids, calls(ids.shape[1], chunked=True))
    lengths = torch.stack([layer.self_attn.lengths for layer in reference.model.layers])
    assert torch.equal(cache.slot_counts(), lengths)
    assert (lengths < ids.shape[1]).any() and (lengths > window + 1).all(), "evicts and keeps"


@pytest.mark.parametrize("source", ["heads", "query"])
@pytest.mark.parametrize("window", [0, 4, 12])
@pytest.mark.parametrize("chunked", [False, True])
def test_cached_decode_equals_the_full_forward(window, chunked, source):
    model = dms_model(window, source)
    with torch.no_grad():
        expected = model(IDS, use_cache=False).logits
    logits, cache = run_cached(model, IDS, calls(IDS.shape[1], chunked))
    assert relative_error(logits, expected) <= 1e-5
    assert (cache.slot_counts() < IDS.shape[1]).any(), "some tokens must be evicted"


def test_dms_config_refusals():
    with pytest.raises(ValueError, match="dmc_window_size 1"):
        tiny_config(dmc_kv_method="dms", dmc_decision_source="heads")
    with pytest.raises(ValueError, match="'dmc' or 'dms'"):
        tiny_config(dmc_kv_method="h2o")
    with pytest.raises(ValueError, match="needs dmc_kv_method 'dms'"):
        tiny_config(dmc_decision_source="query")
    with pytest.raises(ValueError, match="'heads' or 'query'"):
        tiny_config(dmc_kv_method="dms", dmc_window_size=1)
