"""Single-process checks of the seam: DMC layer vs the ops, zero_out identities, recompute.

Legend: S sequence, B batch, H query heads, G KV heads, T time, D head dim.
"""

import pytest
import torch

from megatron_dmc.distributed import destroy_distributed, initialize_distributed, seed_everything
from megatron_dmc.model import (
    DecisionCollector,
    build_model,
    set_zero_out_lambda,
    to_transformer_config,
    zero_decision_rows,
)
from megatron_dmc.model.decisions import append_carry_row, split_carry_row
from megatron_dmc.model.layout import to_bhtd, to_sbhd
from megatron_dmc.ops import DMCConfig, dmc_self_attention, rope_cos_sin
from megatron_dmc.schema.llama import LlamaShape
from tests.model.helpers import batch_BS, relative_error, run_step

TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def single_process_world():
    initialize_distributed(seed=11)
    yield
    destroy_distributed()


def _build(name: str, attention: str, seed: int = 5, **overrides):
    shape = LlamaShape.from_yaml(name)
    transformer_config = to_transformer_config(shape, **overrides) if overrides else None
    seed_everything(seed)
    return build_model(shape, attention, transformer_config=transformer_config)


def _logits(model, tokens_BS):
    positions_BS = torch.arange(tokens_BS.shape[1]).expand_as(tokens_BS)
    out = model(tokens_BS, positions_BS, None)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", ["tiny_mha", "tiny_gqa"])
def test_zero_out_identities(name):
    tokens_BS = batch_BS(1)
    vanilla, zero_out, dmc = (_build(name, mode).eval() for mode in ("vanilla", "zero_out", "dmc"))
    with torch.no_grad():
        reference = _logits(vanilla, tokens_BS)
        assert torch.equal(_logits(zero_out, tokens_BS), reference)
        assert set_zero_out_lambda(zero_out, 0.0) == LlamaShape.from_yaml(name).num_hidden_layers
        assert relative_error(_logits(zero_out, tokens_BS), reference) > 1e-3
        for model in (zero_out, dmc):
            zero_decision_rows(model)
        stage1 = _logits(zero_out, tokens_BS)
        assert relative_error(_logits(dmc, tokens_BS), stage1) <= TOL


def test_zero_decision_rows_hits_only_channel_d_minus_1_of_q_and_k():
    model = _build("tiny_gqa", "vanilla")
    attention = model.decoder.layers[0].self_attention
    hidden_SBH = torch.randn(8, 2, 64)
    q_before, k_before, v_before = attention.get_query_key_value_tensors(hidden_SBH, None)
    assert zero_decision_rows(model) == 4 * (2 + 4)
    q, k, v = attention.get_query_key_value_tensors(hidden_SBH, None)
    assert torch.all(q[..., -1] == 0) and torch.all(k[..., -1] == 0)
    assert torch.equal(q[..., :-1], q_before[..., :-1]) and torch.equal(
        k[..., :-1], k_before[..., :-1]
    )
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("name", ["tiny_mha", "tiny_gqa"])
def test_dmc_layer_equals_ops(name, training):
    model = _build(name, "dmc").train(training)
    attention = model.decoder.layers[1].self_attention
    with torch.no_grad():  # k[D-1] near c, so alpha is mixed rather than all-append
        groups, rows, head_dim = 2 if name == "tiny_gqa" else 4, -1, 16
        attention.linear_qkv.weight.view(groups, rows, head_dim, 64)[:, -2, -1] *= 400.0
    collector = DecisionCollector(noise_seed=3)
    attention.collector = collector
    collector.begin_forward()
    s, b = 24, 2
    hidden_SBH = torch.randn(s, b, 64)
    out_SBH, _ = attention(hidden_SBH, None, rotary_pos_emb=model.rotary_pos_emb(s))

    q, k, v = attention.get_query_key_value_tensors(hidden_SBH, None)
    cos_TD, sin_TD = rope_cos_sin(torch.arange(s), head_dim, theta=10000.0)
    expected_BHTD, decisions = dmc_self_attention(
        to_bhtd(q),
        to_bhtd(k),
        to_bhtd(v),
        cos_TD,
        sin_TD,
        DMCConfig(),
        training,
        generator=collector.generator(attention.layer_number),
    )
    expected_SBH, _ = attention.linear_proj(to_sbhd(expected_BHTD).reshape(s, b, -1))
    assert relative_error(out_SBH, expected_SBH) <= TOL
    hard_mean = decisions.alpha_ste_BGT.mean().item()
    assert 0.05 < hard_mean < 0.95, f"test needs mixed decisions, got mean alpha {hard_mean}"


def test_selective_recompute_gives_bit_identical_gradients():
    tokens_BS = batch_BS(2)
    plain = _build("tiny_gqa", "dmc")
    recompute = _build(
        "tiny_gqa", "dmc", recompute_granularity="selective", recompute_modules=["core_attn"]
    )
    assert recompute.decoder.layers[0].self_attention.checkpoint_core_attention
    losses = [run_step(model, tokens_BS) for model in (plain, recompute)]
    assert [d["loss"] for d in losses[0]] == [d["loss"] for d in losses[1]]
    for (name, p), (_, q) in zip(plain.named_parameters(), recompute.named_parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_full_recompute_rejected_for_dmc():
    with pytest.raises(ValueError, match="full-layer activation recompute"):
        _build(
            "tiny_gqa",
            "dmc",
            recompute_granularity="full",
            recompute_method="uniform",
            recompute_num_layers=1,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_carry_row_is_exact_and_passes_the_gradient(dtype):
    hidden_SBH = torch.randn(5, 3, 8, dtype=dtype)
    sum_B = torch.tensor([1234567.0, 0.0, 3.5], requires_grad=True)
    carried = append_carry_row(hidden_SBH, sum_B)
    assert carried.shape == (6, 3, 8)
    hidden_back, sum_back = split_carry_row(carried)
    assert torch.equal(hidden_back, hidden_SBH) and torch.equal(sum_back, sum_B.detach())
    (sum_back * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(sum_B.grad, torch.tensor([1.0, 2.0, 3.0]))
