"""DMS: the shared parallel form with one token per slot equals token-by-token eviction."""

import math

import pytest
import torch

from megatron_dmc.ops import (
    DMCConfig,
    apply_rope,
    compression_loss,
    counted_decisions,
    decision_head_logits,
    dmc_self_attention,
)
from megatron_dmc.ops.dms import dms_config, dms_sequential_reference
from tests.ops.helpers import random_qkv
from tests.ops.test_delay import PATTERNS, _head_logits, _relative_error


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(("heads", "groups"), [(3, 3), (6, 2), (4, 1)])
@pytest.mark.parametrize("window", [0, 1, 4, 28, 40])
def test_dms_parallel_equals_sequential(pattern, heads, groups, window):
    q, k, v, cos, sin, _ = random_qkv(2, heads, groups, 29, 8, pattern, seed=window)
    logits = _head_logits(2, groups, 29, pattern, window)
    config = dms_config(window)
    out_parallel, decisions = dmc_self_attention(
        q, k, v, cos, sin, config, training=False, logits=logits
    )
    out_sequential, lengths_BG = dms_sequential_reference(q, k, v, cos, sin, config, logits)
    assert _relative_error(out_parallel, out_sequential) <= 1e-10
    kept_BG = 29 - counted_decisions(decisions.alpha_BGT, window).sum(-1)
    assert torch.equal(lengths_BG.to(torch.float64), kept_BG)


@pytest.mark.parametrize("window", [0, 3])
def test_dms_is_dmc_with_one_token_slots(window):
    q, k, v, cos, sin, _ = random_qkv(1, 4, 2, 23, 8, "random", seed=7)
    logits = _head_logits(1, 2, 23, "random", 7)
    dmc = DMCConfig(window_size=1, decision_source="heads", merge_delay=window)
    out_dms, _ = dmc_self_attention(q, k, v, cos, sin, dms_config(window), False, logits=logits)
    out_dmc, _ = dmc_self_attention(q, k, v, cos, sin, dmc, False, logits=logits)
    assert _relative_error(out_dms, out_dmc) <= 1e-12


def _explicit_training_form(q, k, v, cos, sin, alpha_BGT, window):
    """softmax(q k^T * scale + [i - j > W] log(1 - alpha_{j+1})) v, keys of every token."""
    q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    r = q.shape[1] // k.shape[1]
    k_rot, v_rep = k_rot.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    scores = q_rot @ k_rot.transpose(-1, -2) / math.sqrt(q.shape[-1])
    next_alpha = torch.cat([alpha_BGT[..., 1:], torch.zeros_like(alpha_BGT[..., :1])], -1)
    bias = torch.log1p(-next_alpha).repeat_interleave(r, 1)[:, :, None, :]
    t = q.shape[2]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    scores = torch.where(i - j > window, scores + bias, scores)
    scores = scores.masked_fill(j > i, float("-inf"))
    return torch.softmax(scores, -1) @ v_rep


@pytest.mark.parametrize("window", [0, 2, 5])
def test_dms_training_form_biases_keys_behind_the_window(window):
    q, k, v, cos, sin, _ = random_qkv(2, 4, 2, 19, 8, "random", seed=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 19, 12, generator=gen, dtype=torch.float64)
    weight = 0.05 * torch.randn(4, 12, generator=gen, dtype=torch.float64)
    logits = decision_head_logits(x, weight, 5.0)
    out, decisions = dmc_self_attention(
        q, k, v, cos, sin, dms_config(window), True, torch.Generator().manual_seed(1), logits
    )
    expected = _explicit_training_form(q, k, v, cos, sin, decisions.alpha_BGT, window)
    assert _relative_error(out, expected) <= 1e-10
    soft = decisions.alpha_BGT
    assert ((soft > 0) & (soft < 1)).any(), "training decisions must stay relaxed"
    assert torch.equal(decisions.alpha_ste_BGT.detach(), (soft > 0.5).to(soft.dtype))


def test_dms_gradients_reach_the_decision_heads():
    q, k, v, cos, sin, _ = random_qkv(1, 2, 1, 17, 8, "random", seed=5)
    x = torch.randn(1, 17, 6, dtype=torch.float64)
    weight = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)
    logits = decision_head_logits(x, weight, 5.0)
    config = dms_config(2)
    out, decisions = dmc_self_attention(
        q, k, v, cos, sin, config, True, torch.Generator().manual_seed(0), logits
    )
    loss = out.square().sum() + compression_loss(decisions.alpha_ste_BGT.sum((1, 2)), 17, 2.0)
    loss.backward()
    assert weight.grad[0].abs().sum() > 0


def test_zero_heads_evict_nothing_in_eval():
    q, k, v, cos, sin, _ = random_qkv(1, 4, 2, 21, 8, "random", seed=2)
    x = torch.randn(1, 21, 10, dtype=torch.float64)
    logits = decision_head_logits(x, torch.zeros(4, 10, dtype=torch.float64), 5.0)
    out, lengths_BG = dms_sequential_reference(q, k, v, cos, sin, dms_config(0), logits)
    assert torch.equal(lengths_BG, torch.full((1, 2), 21))
    plain = _explicit_training_form(q, k, v, cos, sin, torch.zeros(1, 2, 21), 0)
    assert _relative_error(out, plain.to(out.dtype)) <= 1e-12


def test_cr_loss_reads_the_hard_eviction_fraction_of_the_cache():
    q, k, v, cos, sin, _ = random_qkv(3, 2, 2, 30, 8, "random", seed=4)
    logits = _head_logits(3, 2, 30, "random", 4)
    config = dms_config(4)
    _, decisions = dmc_self_attention(q, k, v, cos, sin, config, False, logits=logits)
    _, lengths_BG = dms_sequential_reference(q, k, v, cos, sin, config, logits)
    counted_B = counted_decisions(decisions.alpha_ste_BGT, 4).sum((1, 2))
    evicted_B = (30 - lengths_BG).sum(1).to(torch.float64)
    assert torch.equal(counted_B, evicted_B)
    for cr in (1.5, 4.0, 8.0):
        expected = torch.relu(1 - 1 / cr - evicted_B / 60).mean()
        assert torch.allclose(compression_loss(counted_B, 60, cr), expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kv_method="dms", decision_source="heads"), "window_size=1"),
        (dict(kv_method="dms", window_size=1), "decision_source in"),
        (dict(kv_method="h2o"), "kv_method must be one of"),
    ],
)
def test_dms_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DMCConfig(**kwargs)


def test_sequential_reference_refuses_dmc():
    q, k, v, cos, sin, _ = random_qkv(1, 2, 1, 5, 8)
    logits = _head_logits(1, 1, 5, "random", 0)
    with pytest.raises(ValueError, match="kv_method='dms'"):
        dms_sequential_reference(q, k, v, cos, sin, DMCConfig(decision_source="heads"), logits)
