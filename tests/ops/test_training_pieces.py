"""Gumbel-sigmoid, STE, the compression loss, the schedules and input validation."""

import pytest
import torch

from megatron_dmc.ops import (
    CRSchedule,
    DMCConfig,
    ZeroOutSchedule,
    achieved_compression_ratio,
    compression_loss,
    dmc_attention,
    dmc_self_attention,
    gumbel_sigmoid,
    importance_weights,
    straight_through,
    windowed_partial_accumulation,
)
from tests.ops.helpers import random_qkv


def test_straight_through_is_hard_forward_soft_backward():
    logits = torch.tensor([-2.0, -0.1, 0.3, 4.0], dtype=torch.float64, requires_grad=True)
    alpha = torch.sigmoid(logits)
    hard = straight_through(alpha)
    assert hard.tolist() == [0.0, 0.0, 1.0, 1.0]
    hard.sum().backward()
    assert torch.allclose(logits.grad, alpha * (1 - alpha))


def test_gumbel_sigmoid_hard_rate_follows_the_logit():
    gen = torch.Generator().manual_seed(0)
    for logit in (-2.0, 0.0, 1.5):
        samples = gumbel_sigmoid(torch.full((200_000,), logit), 0.1, gen)
        merge_rate = (samples > 0.5).double().mean().item()
        assert abs(merge_rate - torch.sigmoid(torch.tensor(logit)).item()) < 0.01


def test_gumbel_sigmoid_is_nearly_binary_at_low_temperature():
    samples = gumbel_sigmoid(torch.zeros(10_000), 0.1, torch.Generator().manual_seed(1))
    assert ((samples < 0.05) | (samples > 0.95)).double().mean() > 0.6


def test_training_forward_uses_relaxed_decisions_and_ste_for_the_loss():
    q, k, v, cos, sin, _ = random_qkv(1, 2, 2, 12, 8, "random", dtype=torch.float32)
    k.requires_grad_()
    gen = torch.Generator().manual_seed(0)
    _, decisions = dmc_self_attention(q, k, v, cos, sin, DMCConfig(), training=True, generator=gen)
    soft = decisions.alpha_BGT
    assert ((soft > 0) & (soft < 1)).any()
    assert torch.equal(decisions.alpha_ste_BGT.detach(), (soft > 0.5).float().detach())
    decisions.alpha_ste_BGT.sum().backward()
    assert k.grad[..., -1].abs().sum() > 0 and k.grad[..., :-1].abs().sum() == 0


def test_loss_is_zero_when_every_sequence_over_compresses():
    alpha_sum = torch.tensor([80.0, 95.0])
    assert compression_loss(alpha_sum, 100, target_cr=4.0).item() == 0.0  # needs 0.75


def test_loss_is_per_sequence():
    """Sequence 0's surplus does not pay for sequence 1's deficit."""
    alpha_sum = torch.tensor([100.0, 0.0])
    loss = compression_loss(alpha_sum, 100, target_cr=2.0)
    assert loss.item() == pytest.approx(0.25)  # mean(max(0, .5-1), max(0, .5-0))


def test_loss_gradient_flows_only_from_deficient_sequences():
    alpha_sum = torch.tensor([30.0, 70.0], requires_grad=True)
    compression_loss(alpha_sum, 100, target_cr=2.0).backward()
    assert alpha_sum.grad.tolist() == [pytest.approx(-0.005), 0.0]


def test_achieved_compression_ratio():
    assert achieved_compression_ratio(0.0) == 1.0
    assert achieved_compression_ratio(0.75) == pytest.approx(4.0)


def test_cr_schedule_is_linear_in_cr():
    schedule = CRSchedule(target_cr=4.0, ramp_iters=300)
    assert [schedule(s) for s in (0, 150, 300, 1000)] == [1.0, 2.5, 4.0, 4.0]


def test_zero_out_schedule():
    schedule = ZeroOutSchedule(anneal_iters=200)
    assert [schedule(s) for s in (0, 100, 200, 250)] == [1.0, 0.5, 0.0, 0.0]


def test_importance_averages_over_the_query_group():
    q = torch.zeros(1, 4, 1, 2)
    q[0, :, 0, -1] = torch.tensor([1.0, 3.0, -2.0, -4.0])
    omega = importance_weights(q, num_kv_heads=2, init_val=5.0)
    expected = torch.sigmoid(torch.tensor([7.0, 2.0])) + torch.finfo(torch.float32).eps
    assert torch.allclose(omega[0, :, 0], expected)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: CRSchedule(0.5, 10), "target_cr must be >= 1.0"),
        (lambda: compression_loss(torch.zeros(2), 1, 0.9), "target_cr must be >= 1.0"),
        (lambda: DMCConfig(window_size=0), "window must be an integer >= 1"),
        (lambda: DMCConfig(temperature=0.0), "temperature must be > 0"),
        (lambda: ZeroOutSchedule(0), "anneal_iters must be >= 1"),
    ],
)
def test_bad_hyperparameters_are_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_shapes_are_rejected():
    q, k, v, cos, sin, _ = random_qkv(1, 6, 3, 5, 8)
    with pytest.raises(
        ValueError, match=r"num_heads \(6\) must be divisible by num_kv_heads \(4\)"
    ):
        dmc_self_attention(
            q,
            k[:, :1].expand(1, 4, 5, 8),
            v[:, :1].expand(1, 4, 5, 8),
            cos,
            sin,
            DMCConfig(),
            False,
        )
    with pytest.raises(ValueError, match="head dim must be >= 2"):
        dmc_self_attention(q[..., :1], k[..., :1], v[..., :1], cos, sin, DMCConfig(), False)
    with pytest.raises(ValueError, match=r"q must have 4 dims"):
        dmc_self_attention(q[0], k, v, cos, sin, DMCConfig(), False)
    with pytest.raises(ValueError, match="does not match q shape"):
        dmc_attention(q, k[:, :, :4], v[:, :, :4], torch.zeros(1, 3, 4))
    alpha = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        windowed_partial_accumulation(k, v, alpha, alpha, window=0)
    with pytest.raises(ValueError, match=r"alpha \(1, 3, 4\) and omega"):
        windowed_partial_accumulation(k, v, alpha, alpha, window=2)
