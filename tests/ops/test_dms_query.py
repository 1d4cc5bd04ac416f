"""DMS with the reference's other decision source: the repurposed query neuron."""

import pytest
import torch
import torch.nn.functional as F

from megatron_dmc.ops import (
    DMCConfig,
    apply_rope,
    counted_decisions,
    dmc_self_attention,
    query_decision_logits,
    rope_for_query,
    rope_without_decision_channel,
)
from megatron_dmc.ops.dms import dms_config, dms_sequential_reference
from tests.ops.helpers import merge_pattern, random_qkv
from tests.ops.test_delay import PATTERNS, _relative_error


def query_qkv(batch, heads, groups, length, pattern, seed):
    """Random q, k, v whose first query head of each group encodes `pattern` in channel D-1
    (logit 100 * q - 5 = +-margin); the other heads' channel D-1 stays random."""
    q, k, v, cos, sin, _ = random_qkv(batch, heads, groups, length, 8, "random", seed)
    gen = torch.Generator().manual_seed(seed + 100)
    evict_BGT = merge_pattern(pattern, batch, groups, length, gen)
    margin_BGT = 0.1 + torch.rand(batch, groups, length, generator=gen, dtype=q.dtype)
    q[:, :: heads // groups, :, -1] = (5.0 + torch.where(evict_BGT, margin_BGT, -margin_BGT)) / 100
    return q, k, v, cos, sin, evict_BGT


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(("heads", "groups"), [(3, 3), (6, 2), (4, 1)])
@pytest.mark.parametrize("window", [0, 1, 4, 28])
def test_query_source_parallel_equals_sequential(pattern, heads, groups, window):
    q, k, v, cos, sin, evict_BGT = query_qkv(2, heads, groups, 29, pattern, window)
    config = dms_config(window, decision_source="query")
    out_parallel, decisions = dmc_self_attention(q, k, v, cos, sin, config, training=False)
    out_sequential, lengths_BG = dms_sequential_reference(q, k, v, cos, sin, config)
    assert _relative_error(out_parallel, out_sequential) <= 1e-10
    expected_BGT = evict_BGT.clone()
    expected_BGT[..., 0] = False
    assert torch.equal(decisions.alpha_BGT.bool(), expected_BGT)
    kept_BG = 29 - counted_decisions(decisions.alpha_BGT, window).sum(-1)
    assert torch.equal(lengths_BG.to(torch.float64), kept_BG)


def test_logit_reads_the_first_query_head_of_each_group_scaled_by_100():
    q = torch.randn(2, 6, 5, 8, dtype=torch.float64)
    logits = query_decision_logits(q, 2, 5.0)
    assert torch.equal(logits.alpha_BGT, torch.stack([q[:, 0, :, -1], q[:, 3, :, -1]], 1) * 100 - 5)
    assert torch.equal(logits.omega_BGT, torch.full((2, 2, 5), 5.0, dtype=torch.float64))


def test_only_the_first_head_of_each_group_loses_its_channel():
    q, _, _, cos, sin, _ = random_qkv(1, 6, 2, 7, 8, "random", seed=1)
    rotated = rope_for_query(q, cos, sin, dms_config(0, decision_source="query"), 2)
    for h in range(6):
        if h % 3 == 0:
            expected = rope_without_decision_channel(q[:, h], cos, sin)
            assert torch.equal(rotated[:, h, :, -1], torch.zeros_like(rotated[:, h, :, -1]))
        else:
            expected = apply_rope(q[:, h], cos, sin)
        assert torch.allclose(rotated[:, h], expected, rtol=0, atol=1e-15)


def test_a_zeroed_query_neuron_evicts_nothing():
    q, k, v, cos, sin, _ = query_qkv(1, 4, 2, 21, "all_merge", 3)
    q[:, ::2, :, -1] = 0.0
    config = dms_config(0, decision_source="query")
    out, decisions = dmc_self_attention(q, k, v, cos, sin, config, training=False)
    assert not decisions.alpha_BGT.any()
    q_rot = rope_for_query(q, cos, sin, config, 2)
    plain = F.scaled_dot_product_attention(
        q_rot, apply_rope(k, cos, sin), v, is_causal=True, enable_gqa=True
    )
    assert _relative_error(out, plain) <= 1e-12
    _, lengths_BG = dms_sequential_reference(q, k, v, cos, sin, config)
    assert torch.equal(lengths_BG, torch.full((1, 2), 21))
    training = dmc_self_attention(q, k, v, cos, sin, config, True, torch.Generator())[1]
    assert float(training.alpha_BGT.mean()) < 0.05


def test_training_gradient_reaches_the_query_neuron():
    q, k, v, cos, sin, _ = query_qkv(1, 4, 2, 17, "random", 5)
    q.requires_grad_(True)
    config = dms_config(2, decision_source="query")
    out, decisions = dmc_self_attention(q, k, v, cos, sin, config, True, torch.Generator())
    (out.square().sum() + decisions.alpha_ste_BGT.sum()).backward()
    assert q.grad[:, ::2, :, -1].abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(decision_source="query"), "kv_method='dms'"),
        (dict(kv_method="dms", window_size=1, decision_source="channel"), "decision_source in"),
    ],
)
def test_query_source_is_dms_only(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DMCConfig(**kwargs)
