"""The CR loss with an overshoot band and the CR asked at a reference length (delayed merging)."""

import pytest
import torch

from megatron_dmc.ops import compression_loss, training_length_cr


def test_over_compression_beyond_the_band_is_charged():
    """2x with a 25% band: free for fractions 0.5 .. 0.6 (1 - 1/2.5), charged outside."""
    alpha_sum_B = torch.tensor([70.0, 55.0, 20.0], requires_grad=True)
    loss = compression_loss(alpha_sum_B, 100, target_cr=2.0, overshoot=0.25)
    assert loss.item() == pytest.approx((0.1 + 0.0 + 0.3) / 3)
    loss.backward()
    assert alpha_sum_B.grad.tolist() == pytest.approx([0.01 / 3, 0.0, -0.01 / 3])


def test_one_sided_loss_is_the_default():
    alpha_sum_B = torch.tensor([80.0, 20.0])
    assert compression_loss(alpha_sum_B, 100, 2.0).item() == pytest.approx(0.15)
    with pytest.raises(ValueError, match="overshoot must be >= 0"):
        compression_loss(alpha_sum_B, 100, 2.0, overshoot=-0.1)


def _slots(length: int, delay: int, keep_rate: float) -> float:
    exact = min(delay, length)
    return exact + (length - exact) * keep_rate


@pytest.mark.parametrize(("target", "reference"), [(2.0, 1152), (4.0, 4096), (2.0, 300)])
def test_the_training_length_rate_reaches_the_target_at_the_reference_length(target, reference):
    """A T-token sequence at the returned CR merges the tokens out of its window at the
    rate that leaves exactly reference / target slots in a reference-length sequence."""
    length, delay = 512, 64
    train_cr = training_length_cr(target, length, delay, reference)
    keep_rate = (length / train_cr - delay) / (length - delay)
    assert reference / _slots(reference, delay, keep_rate) == pytest.approx(target, rel=1e-12)
    assert (train_cr < target) == (reference > length)


@pytest.mark.parametrize(("delay", "reference"), [(0, 4096), (64, None), (64, 512)])
def test_the_paper_accounting_where_the_reference_changes_nothing(delay, reference):
    assert training_length_cr(3.0, 512, delay, reference) == 3.0


def test_an_unreachable_reference_is_refused():
    with pytest.raises(ValueError, match="cannot reach 8x"):
        training_length_cr(8.0, 512, 64, 256)
