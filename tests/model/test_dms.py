"""DMS (kv_method="dms") through the shared Megatron layer: the layer equals the ops."""

import pytest
import torch

from megatron_dmc.distributed import destroy_distributed, initialize_distributed, seed_everything
from megatron_dmc.model import DecisionCollector, build_model
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
