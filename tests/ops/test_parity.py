"""The parallel (training-form) DMC attention in eval mode equals Algorithm 1."""

import pytest
import torch
import torch.nn.functional as F

from megatron_dmc.ops import (
    DMCConfig,
    dmc_self_attention,
    dmc_sequential_reference,
    rope_cos_sin,
    rope_without_decision_channel,
)
from tests.ops.helpers import INIT_VALUE, random_qkv

PATTERNS = ["all_append", "all_merge", "alternating", "long_runs", "random"]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(("heads", "groups"), [(3, 3), (6, 2), (4, 1)])
@pytest.mark.parametrize("window", [1, 3, 12])
def test_parallel_equals_sequential(pattern, heads, groups, window):
    q, k, v, cos, sin, _ = random_qkv(2, heads, groups, 29, 8, pattern, seed=window)
    config = DMCConfig(window_size=window, init_val=INIT_VALUE)
    out_parallel, decisions = dmc_self_attention(q, k, v, cos, sin, config, training=False)
    out_sequential, lengths_BG = dmc_sequential_reference(q, k, v, cos, sin, config)
    assert _relative_error(out_parallel, out_sequential) <= 1e-10
    expected_lengths_BG = 29 - decisions.alpha_BGT.sum(-1)
    assert torch.equal(lengths_BG.to(torch.float64), expected_lengths_BG)


@pytest.mark.parametrize(("head_dim", "length"), [(2, 7), (6, 1), (16, 41), (32, 13)])
def test_parallel_equals_sequential_shapes(head_dim, length):
    q, k, v, cos, sin, _ = random_qkv(1, 4, 2, length, head_dim, "random", seed=length)
    config = DMCConfig(window_size=5)
    out_parallel, _ = dmc_self_attention(q, k, v, cos, sin, config, training=False)
    out_sequential, _ = dmc_sequential_reference(q, k, v, cos, sin, config)
    assert _relative_error(out_parallel, out_sequential) <= 1e-10


def test_decision_patterns_are_what_they_claim():
    q, k, v, cos, sin, merge_BGT = random_qkv(1, 2, 2, 30, 8, "long_runs")
    _, decisions = dmc_self_attention(q, k, v, cos, sin, DMCConfig(), training=False)
    expected_BGT = merge_BGT.to(torch.float64)
    expected_BGT[..., 0] = 0.0  # the first token always appends
    assert torch.equal(decisions.alpha_BGT, expected_BGT)


def test_first_token_appends_even_if_it_asks_to_merge():
    q, k, v, cos, sin, _ = random_qkv(1, 2, 1, 5, 4, "all_merge")
    out, lengths_BG = dmc_sequential_reference(q, k, v, cos, sin, DMCConfig())
    assert lengths_BG.tolist() == [[1]]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("heads", "groups"), [(4, 4), (4, 2)])
def test_zeroed_channel_is_plain_causal_attention_without_it(heads, groups):
    """Stage-1 model: channel D-1 of q and k is 0, so every token appends with equal weight."""
    q, k, v, cos, sin, _ = random_qkv(2, heads, groups, 23, 8, "random")
    q[..., -1] = 0.0
    k[..., -1] = 0.0
    out, decisions = dmc_self_attention(q, k, v, cos, sin, DMCConfig(), training=False)
    assert decisions.alpha_BGT.sum() == 0
    q_rot = rope_without_decision_channel(q, cos, sin)
    k_rot = rope_without_decision_channel(k, cos, sin)
    expected = F.scaled_dot_product_attention(
        q_rot, k_rot, v, is_causal=True, enable_gqa=heads != groups
    )
    assert _relative_error(out, expected) <= 1e-12


def test_stage1_model_differs_from_original_rope():
    """Removing channel D-1 after RoPE also drops the sin part of pair (D/2-1, D-1)."""
    cos, sin = rope_cos_sin(torch.arange(4), 8, 10000.0, torch.float64)
    x = torch.zeros(1, 1, 4, 8, dtype=torch.float64)
    x[..., 3] = 1.0
    rotated = rope_without_decision_channel(x, cos, sin)
    assert torch.allclose(rotated[..., 3], cos[:, 3])
    assert rotated[..., 7].abs().max() == 0
