"""The decision threshold tau: alpha logits are lowered by tau on every path, so a model
with tau equals one whose alpha logits were tau lower, and the sequential reference still
equals the parallel form."""

import math
from dataclasses import replace

import pytest
import torch

from megatron_dmc.ops import (
    DecisionLogits,
    DMCConfig,
    dmc_self_attention,
    dmc_sequential_reference,
    make_decisions,
)
from megatron_dmc.ops.dms import dms_config, dms_sequential_reference
from tests.ops.helpers import random_qkv


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_threshold_is_refused(bad):
    with pytest.raises(ValueError, match="decision_threshold must be a finite number"):
        DMCConfig(decision_threshold=bad)


@pytest.mark.parametrize("threshold", [-0.4, 0.35, 0.7])
def test_channel_threshold_flips_exactly_the_decisions_below_it(threshold):
    q, k, *_ = random_qkv(2, 4, 2, 31, 8, "random", seed=3)
    config = DMCConfig(window_size=5, decision_threshold=threshold)
    decisions = make_decisions(q, k, config, training=False)
    margin_BGT = k[..., -1] - config.init_val
    expected_BGT = (margin_BGT > threshold).to(q.dtype)
    expected_BGT[..., 0] = 0.0
    assert torch.equal(decisions.alpha_BGT, expected_BGT)
    changed = (margin_BGT > 0) != (margin_BGT > threshold)
    assert changed[..., 1:].any()  # the threshold really moved some decisions


@pytest.mark.parametrize("delay", [0, 6])
def test_heads_threshold_equals_shifted_logits(delay):
    q, k, v, cos, sin, _ = random_qkv(1, 4, 2, 29, 8, "random", seed=5)
    gen = torch.Generator().manual_seed(7)
    logits = DecisionLogits(
        torch.randn(1, 2, 29, generator=gen, dtype=q.dtype),
        torch.randn(1, 2, 29, generator=gen, dtype=q.dtype),
    )
    shifted = DecisionLogits(logits.alpha_BGT - 0.5, logits.omega_BGT)
    base = DMCConfig(window_size=4, decision_source="heads", merge_delay=delay)
    tau = DMCConfig(window_size=4, decision_source="heads", merge_delay=delay,
                    decision_threshold=0.5)  # fmt: skip
    out_tau, dec_tau = dmc_self_attention(q, k, v, cos, sin, tau, training=False, logits=logits)
    out_shift, dec_shift = dmc_self_attention(
        q, k, v, cos, sin, base, training=False, logits=shifted
    )
    assert torch.equal(dec_tau.alpha_BGT, dec_shift.alpha_BGT)
    assert torch.equal(out_tau, out_shift)
    out_seq, _ = dmc_sequential_reference(q, k, v, cos, sin, tau, logits=logits)
    assert _relative_error(out_tau, out_seq) <= 1e-10


def test_dms_threshold_parallel_equals_sequential():
    q, k, v, cos, sin, _ = random_qkv(1, 4, 2, 33, 8, "random", seed=9)
    gen = torch.Generator().manual_seed(11)
    logits = DecisionLogits(
        3 * torch.randn(1, 2, 33, generator=gen, dtype=q.dtype),
        torch.zeros(1, 2, 33, dtype=q.dtype),
    )
    config = replace(dms_config(5), decision_threshold=-1.0)
    out_parallel, _ = dmc_self_attention(q, k, v, cos, sin, config, training=False, logits=logits)
    out_sequential, _ = dms_sequential_reference(q, k, v, cos, sin, config, logits=logits)
    assert _relative_error(out_parallel, out_sequential) <= 1e-10
