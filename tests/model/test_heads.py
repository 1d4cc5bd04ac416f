"""Decision heads, merge delay and compression_off in the Megatron layer."""

import pytest
import torch

from megatron_dmc.distributed import destroy_distributed, initialize_distributed, seed_everything
from megatron_dmc.model import DecisionCollector, DMCSelfAttention, build_model
from megatron_dmc.model.heads import attention_input
from megatron_dmc.model.layout import to_bhtd, to_sbhd
from megatron_dmc.ops import DMCConfig, decision_head_logits, dmc_self_attention, rope_cos_sin
from megatron_dmc.schema.llama import LlamaShape
from tests.model.helpers import batch_BS, relative_error


@pytest.fixture(scope="module", autouse=True)
def single_process_world():
    initialize_distributed(seed=11)
    yield
    destroy_distributed()


def _build(name: str, attention: str, dmc_config: DMCConfig | None = None):
    seed_everything(5)
    return build_model(LlamaShape.from_yaml(name), attention, dmc_config=dmc_config)


def _logits(model, tokens_BS):
    positions_BS = torch.arange(tokens_BS.shape[1]).expand_as(tokens_BS)
    out = model(tokens_BS, positions_BS, None)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("delay", [0, 5])
@pytest.mark.parametrize("name", ["tiny_mha", "tiny_gqa"])
def test_heads_model_at_init_is_the_original(name, delay):
    tokens_BS = batch_BS(1)
    vanilla = _build(name, "vanilla").eval()
    heads = _build(name, "dmc", DMCConfig(decision_source="heads", merge_delay=delay)).eval()
    with torch.no_grad():
        reference = _logits(vanilla, tokens_BS)
        assert relative_error(_logits(heads, tokens_BS), reference) <= 1e-6
        channel = _build(name, "dmc", DMCConfig(merge_delay=delay)).eval()
        assert relative_error(_logits(channel, tokens_BS), reference) > 1e-3


@pytest.mark.parametrize("source", ["channel", "heads"])
def test_compression_off_is_vanilla_attention(source):
    tokens_BS = batch_BS(1)
    vanilla = _build("tiny_gqa", "vanilla").eval()
    dmc = _build("tiny_gqa", "dmc", DMCConfig(decision_source=source, merge_delay=3)).eval()
    layers = [m for m in dmc.modules() if isinstance(m, DMCSelfAttention)]
    with torch.no_grad():
        for layer in layers:
            layer.compression_off = True
        reference = _logits(vanilla, tokens_BS)
        assert relative_error(_logits(dmc, tokens_BS), reference) <= 1e-6
        assert dmc.collector.local_stats() == {}
        for layer in layers:
            layer.compression_off = False
        assert relative_error(_logits(dmc, tokens_BS), reference) > (
            1e-3 if source == "channel" else -1.0
        )


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("delay", [0, 4])
@pytest.mark.parametrize("name", ["tiny_mha", "tiny_gqa"])
def test_heads_layer_equals_ops(name, delay, training):
    config = DMCConfig(decision_source="heads", merge_delay=delay)
    model = _build(name, "dmc", config).train(training)
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


def test_heads_weight_is_a_layer_parameter_and_trains():
    model = _build("tiny_gqa", "dmc", DMCConfig(decision_source="heads", merge_delay=2)).train()
    names = [n for n, _ in model.named_parameters() if "dmc_decision_proj" in n]
    assert names == [
        f"decoder.layers.{i}.self_attention.dmc_decision_proj.weight" for i in range(4)
    ]
    tokens_BS = batch_BS(1)
    positions_BS = torch.arange(tokens_BS.shape[1]).expand_as(tokens_BS)
    model.collector.start_step(0)
    loss_BS, sums = model(tokens_BS, positions_BS, None, labels=tokens_BS)
    (loss_BS.mean() + sums.alpha_sum_B.sum()).backward()
    grad = model.decoder.layers[0].self_attention.dmc_decision_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_delayed_decision_sums_count_only_tokens_that_left_the_window():
    """All merge (alpha logit +5): per sequence L * G * (T - 1 - W) counted merges of L * G * T."""
    config = DMCConfig(decision_source="heads", merge_delay=3, init_val=-5.0)
    model = _build("tiny_gqa", "dmc", config).eval()
    tokens_BS = batch_BS(1)
    positions_BS = torch.arange(tokens_BS.shape[1]).expand_as(tokens_BS)
    with torch.no_grad():
        _, sums = model(tokens_BS, positions_BS, None)
    layers, groups, length = 4, 2, tokens_BS.shape[1]
    assert sums.count == layers * groups * length
    assert sums.alpha_sum_B.tolist() == [layers * groups * (length - 1 - 3)] * tokens_BS.shape[0]


def test_fused_norm_input_equals_the_separate_input_norm():
    """Transformer Engine fuses the input norm into linear_qkv; the heads then norm the raw
    hidden states themselves, exactly as the local spec's separate norm does."""
    model = _build("tiny_gqa", "vanilla")
    layer = model.decoder.layers[1]
    with torch.no_grad():
        layer.input_layernorm.weight.normal_(1.0, 0.3)
    hidden_SBC = 3.0 * torch.randn(7, 2, 64)
    fused = torch.nn.Module()
    fused.layer_norm_weight = layer.input_layernorm.weight
    expected_SBC = layer.input_layernorm(hidden_SBC)
    assert relative_error(attention_input(hidden_SBC, fused, model.config), expected_SBC) <= 1e-6
    assert attention_input(hidden_SBC, layer.self_attention.linear_qkv, model.config) is hidden_SBC
