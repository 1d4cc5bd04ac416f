"""Delayed merging and decision heads: the parallel form equals Algorithm 1 with a ring."""

import pytest
import torch
import torch.nn.functional as F

from megatron_dmc.ops import (
    DecisionLogits,
    DMCConfig,
    attention_bias,
    counted_decisions,
    decision_head_logits,
    dmc_attention,
    dmc_attention_reference,
    dmc_self_attention,
    dmc_sequential_reference,
)
from tests.ops.helpers import INIT_VALUE, merge_pattern, random_qkv

PATTERNS = ["all_append", "all_merge", "long_runs", "random"]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def _head_logits(batch, groups, length, pattern, seed, dtype=torch.float64):
    """Head logits whose sign encodes `pattern`, with random importance logits."""
    gen = torch.Generator().manual_seed(seed)
    merge_BGT = merge_pattern(pattern, batch, groups, length, gen)
    margin_BGT = 0.1 + torch.rand(batch, groups, length, generator=gen, dtype=dtype)
    omega_BGT = 3.0 * torch.randn(batch, groups, length, generator=gen, dtype=dtype)
    return DecisionLogits(torch.where(merge_BGT, margin_BGT, -margin_BGT), omega_BGT)


def _expected_lengths(alpha_BGT: torch.Tensor, delay: int) -> torch.Tensor:
    length = alpha_BGT.shape[-1]
    return length - counted_decisions(alpha_BGT, delay).sum(-1)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(("heads", "groups"), [(3, 3), (6, 2), (4, 1)])
@pytest.mark.parametrize("delay", [1, 4, 28, 40])
@pytest.mark.parametrize("source", ["channel", "heads"])
def test_delayed_parallel_equals_sequential(pattern, heads, groups, delay, source):
    q, k, v, cos, sin, _ = random_qkv(2, heads, groups, 29, 8, pattern, seed=delay)
    logits = _head_logits(2, groups, 29, pattern, delay) if source == "heads" else None
    config = DMCConfig(window_size=5, decision_source=source, merge_delay=delay)
    out_parallel, decisions = dmc_self_attention(
        q, k, v, cos, sin, config, training=False, logits=logits
    )
    out_sequential, lengths_BG = dmc_sequential_reference(q, k, v, cos, sin, config, logits)
    assert _relative_error(out_parallel, out_sequential) <= 1e-10
    expected_BG = _expected_lengths(decisions.alpha_BGT, delay)
    assert torch.equal(lengths_BG.to(torch.float64), expected_BG)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(("heads", "groups"), [(3, 3), (4, 2), (4, 1)])
def test_heads_mode_without_delay_equals_sequential(pattern, heads, groups):
    q, k, v, cos, sin, _ = random_qkv(1, heads, groups, 31, 8, pattern, seed=3)
    logits = _head_logits(1, groups, 31, pattern, 7)
    config = DMCConfig(window_size=12, decision_source="heads")
    out_parallel, _ = dmc_self_attention(q, k, v, cos, sin, config, training=False, logits=logits)
    out_sequential, _ = dmc_sequential_reference(q, k, v, cos, sin, config, logits)
    assert _relative_error(out_parallel, out_sequential) <= 1e-10


@pytest.mark.parametrize(("heads", "groups"), [(4, 4), (4, 2), (4, 1)])
def test_zero_heads_are_the_original_attention(heads, groups):
    """Zero weights: eval appends everything, no channel is touched: plain causal RoPE attention."""
    q, k, v, cos, sin, _ = random_qkv(2, heads, groups, 23, 8, "random")
    x_BTC = torch.randn(2, 23, 16, dtype=torch.float64)
    logits = decision_head_logits(x_BTC, torch.zeros(2 * groups, 16, dtype=torch.float64), 5.0)
    expected = F.scaled_dot_product_attention(
        q * cos + torch.cat([-q[..., 4:], q[..., :4]], -1) * sin,
        k * cos + torch.cat([-k[..., 4:], k[..., :4]], -1) * sin,
        v,
        is_causal=True,
        enable_gqa=heads != groups,
    )
    for delay in (0, 5):
        config = DMCConfig(decision_source="heads", merge_delay=delay)
        out, decisions = dmc_self_attention(q, k, v, cos, sin, config, False, logits=logits)
        assert decisions.alpha_BGT.sum() == 0
        assert _relative_error(out, expected) <= 1e-12


def test_head_logits_layout_and_offset():
    x_BTC = torch.randn(2, 5, 6, dtype=torch.float64)
    weight_NC = torch.randn(6, 6, dtype=torch.float64)
    logits = decision_head_logits(x_BTC, weight_NC, 5.0)
    y_BTN = 100.0 * x_BTC @ weight_NC.t()
    assert torch.allclose(logits.alpha_BGT, y_BTN[..., :3].transpose(1, 2) - 5.0)
    assert torch.allclose(logits.omega_BGT, y_BTN[..., 3:].transpose(1, 2) + 5.0)
    with pytest.raises(ValueError, match="2 \\* kv_heads"):
        decision_head_logits(x_BTC, torch.zeros(5, 6), 5.0)


def test_heads_mode_requires_logits():
    q, k, v, cos, sin, _ = random_qkv(1, 2, 1, 5, 4)
    with pytest.raises(ValueError, match="decision_head_logits"):
        dmc_self_attention(q, k, v, cos, sin, DMCConfig(decision_source="heads"), False)


@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("delay", [1, 3, 8, 17, 30])
def test_fast_delayed_attention_equals_reference(hard, delay):
    gen = torch.Generator().manual_seed(delay)
    q = torch.randn(2, 6, 17, 8, generator=gen, dtype=torch.float64)
    kt, vt, k, v = (torch.randn(2, 2, 17, 8, generator=gen, dtype=torch.float64) for _ in "1234")
    alpha = torch.rand(2, 2, 17, generator=gen, dtype=torch.float64)
    bias = attention_bias((alpha > 0.5).double() if hard else alpha, hard=hard)
    expected = dmc_attention_reference(q, kt, vt, bias, None, k, v, delay)
    actual = dmc_attention(q, kt, vt, bias, None, k, v, delay)
    assert _relative_error(actual, expected) <= 1e-12


def test_delayed_attention_gradcheck():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    kt, vt, k, v = (
        torch.randn(1, 1, 7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in "1234"
    )
    alpha = torch.rand(1, 1, 7, generator=gen, dtype=torch.float64, requires_grad=True)

    def run(q, kt, vt, k, v, alpha):
        return dmc_attention(q, kt, vt, attention_bias(alpha, hard=False), None, k, v, 2)

    assert torch.autograd.gradcheck(run, (q, kt, vt, k, v, alpha))


def test_heads_training_gradients_reach_the_weight():
    """Training form, delay 2: gradients flow from the output into the decision heads."""
    q, k, v, cos, sin, _ = random_qkv(1, 2, 1, 9, 4)
    x_BTC = torch.randn(1, 9, 5, dtype=torch.float64)
    weight_NC = (0.01 * torch.randn(2, 5, dtype=torch.float64)).requires_grad_()
    config = DMCConfig(decision_source="heads", merge_delay=2, window_size=3)

    def run(weight_NC):
        logits = decision_head_logits(x_BTC, weight_NC, 0.0, scale=1.0)
        gen = torch.Generator().manual_seed(0)
        return dmc_self_attention(q, k, v, cos, sin, config, True, gen, logits=logits)[0]

    assert torch.autograd.gradcheck(run, (weight_NC,))


def test_counted_decisions_drop_the_window():
    alpha_BGT = torch.ones(1, 1, 6)
    assert counted_decisions(alpha_BGT, 0).sum() == 6
    assert counted_decisions(alpha_BGT, 2).tolist() == [[[1, 1, 1, 1, 0, 0]]]
    assert counted_decisions(alpha_BGT, 9).sum() == 0


def test_config_validates_the_new_fields():
    with pytest.raises(ValueError, match="decision_source"):
        DMCConfig(decision_source="neuron")
    with pytest.raises(ValueError, match="merge_delay"):
        DMCConfig(merge_delay=-1)
    assert DMCConfig().decision_source == "channel" and DMCConfig().merge_delay == 0


def test_init_val_is_the_heads_offset():
    logits = decision_head_logits(torch.ones(1, 2, 3), torch.zeros(2, 3), INIT_VALUE)
    assert torch.all(logits.alpha_BGT == -INIT_VALUE) and torch.all(logits.omega_BGT == INIT_VALUE)
