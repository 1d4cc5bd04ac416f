"""DMS (kv_method="dms") through the shared Megatron layer: the layer equals the ops."""

import pytest
import torch

from megatron_dmc.distributed import destroy_distributed, initialize_distributed, seed_everything
from megatron_dmc.model import (
    DecisionCollector,
    build_model,
    set_zero_out_lambda,
    zero_decision_rows,
)
from megatron_dmc.model.layout import to_bhtd, to_sbhd
from megatron_dmc.ops import decision_head_logits, dmc_self_attention, dms_config, rope_cos_sin
from megatron_dmc.schema.llama import LlamaShape
from tests.model.helpers import batch_BS, relative_error


@pytest.fixture(scope="module", autouse=True)
def single_process_world():
    initialize_distributed(seed=11)
    yield
    destroy_distributed()


def _build(attention: str, dmc_config=None):
    seed_everything(5)
    return build_model(LlamaShape.from_yaml("tiny_gqa"), attention, dmc_config=dmc_config)


def test_dms_model_at_init_is_the_original():
    tokens_BS = batch_BS(1)
    positions_BS = torch.arange(tokens_BS.shape[1]).expand_as(tokens_BS)
    with torch.no_grad():
        reference = _build("vanilla").eval()(tokens_BS, positions_BS, None)
        dms = _build("dmc", dms_config(4)).eval()(tokens_BS, positions_BS, None)[0]
    assert relative_error(dms, reference) <= 1e-6


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("window", [0, 4])
def test_dms_layer_equals_ops(window, training):
    config = dms_config(window)
    model = _build("dmc", config).train(training)
    attention = model.decoder.layers[1].self_attention
    with torch.no_grad():
        attention.dmc_decision_proj.weight.normal_(0.0, 0.02)
    collector = DecisionCollector(noise_seed=3)
    attention.collector = collector
    collector.begin_forward()
    s, b = 24, 2
    hidden_SBH = torch.randn(s, b, 64)
    out_SBH, _ = attention(hidden_SBH, None, rotary_pos_emb=model.rotary_pos_emb(s))

    q, k, v = attention.get_query_key_value_tensors(hidden_SBH, None)
    weight_NC = attention.dmc_decision_proj.weight.reshape(-1, 64)
    logits = decision_head_logits(hidden_SBH.transpose(0, 1), weight_NC, config.init_val)
    cos_TD, sin_TD = rope_cos_sin(torch.arange(s), 16, theta=10000.0)
    generator = collector.generator(attention.layer_number)
    expected_BHTD, decisions = dmc_self_attention(
        to_bhtd(q), to_bhtd(k), to_bhtd(v), cos_TD, sin_TD, config, training, generator, logits
    )
    expected_SBH, _ = attention.linear_proj(to_sbhd(expected_BHTD).reshape(s, b, -1))
    assert relative_error(out_SBH, expected_SBH) <= 1e-5
    hard_mean = decisions.alpha_ste_BGT.mean().item()
    assert 0.05 < hard_mean < 0.95, f"test needs mixed decisions, got mean alpha {hard_mean}"


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("window", [0, 4])
def test_dms_query_layer_equals_ops(window, training):
    """DMS's query neuron: decisions from channel D-1 of each group's first query head,
    that channel out of attention, keys untouched; no decision heads."""
    config = dms_config(window, decision_source="query")
    model = _build("dmc", config).train(training)
    attention = model.decoder.layers[1].self_attention
    assert not hasattr(attention, "dmc_decision_proj")
    with torch.no_grad():
        attention.linear_qkv.weight.view(2, -1, 16, 64)[:, 0, -1] *= 2.0
    collector = DecisionCollector(noise_seed=3)
    attention.collector = collector
    collector.begin_forward()
    s, b = 24, 2
    hidden_SBH = torch.randn(s, b, 64)
    out_SBH, _ = attention(hidden_SBH, None, rotary_pos_emb=model.rotary_pos_emb(s))

    q, k, v = attention.get_query_key_value_tensors(hidden_SBH, None)
    cos_TD, sin_TD = rope_cos_sin(torch.arange(s), 16, theta=10000.0)
    generator = collector.generator(attention.layer_number)
    expected_BHTD, decisions = dmc_self_attention(
        to_bhtd(q), to_bhtd(k), to_bhtd(v), cos_TD, sin_TD, config, training, generator
    )
    expected_SBH, _ = attention.linear_proj(to_sbhd(expected_BHTD).reshape(s, b, -1))
    assert relative_error(out_SBH, expected_SBH) <= 1e-5
    hard_mean = decisions.alpha_ste_BGT.mean().item()
    assert 0.05 < hard_mean < 0.95, f"test needs mixed decisions, got mean alpha {hard_mean}"


def _logits(model, tokens_BS):
    positions_BS = torch.arange(tokens_BS.shape[1]).expand_as(tokens_BS)
    out = model(tokens_BS, positions_BS, None)
    return out[0] if isinstance(out, tuple) else out


def test_query_zero_out_anneals_only_the_query_neuron_and_dms_starts_from_it():
    """zero_out with decision_source "query" scales channel D-1 of each group's first query
    head only; after it, the DMS model evicts nothing: it equals the stage-1 model."""
    config = dms_config(4, decision_source="query")
    tokens_BS = batch_BS(1)
    vanilla = _build("vanilla").eval()
    zero_out = _build("zero_out", config).eval()
    dms = _build("dmc", config).eval()
    with torch.no_grad():
        reference = _logits(vanilla, tokens_BS)
        assert torch.equal(_logits(zero_out, tokens_BS), reference)
        set_zero_out_lambda(zero_out, 0.0)
        assert relative_error(_logits(zero_out, tokens_BS), reference) > 1e-4
        attention = zero_out.decoder.layers[0].self_attention
        hidden_SBH = torch.randn(8, 2, 64)
        q_before, k_before, v_before = attention.get_query_key_value_tensors(hidden_SBH, None)
        assert zero_decision_rows(zero_out) == 4 * 2  # layers x groups
        assert zero_decision_rows(dms) == 4 * 2
        q, k, v = attention.get_query_key_value_tensors(hidden_SBH, None)
        first = torch.arange(q.shape[2]) % 2 == 0  # 4 query heads, 2 groups
        assert torch.all(q[:, :, first, -1] == 0)
        assert torch.equal(q[:, :, ~first], q_before[:, :, ~first])
        assert torch.equal(q[..., :-1], q_before[..., :-1])
        assert torch.equal(k, k_before) and torch.equal(v, v_before)
        stage1 = _logits(zero_out, tokens_BS)
        assert relative_error(_logits(dms, tokens_BS), stage1) <= 1e-5
