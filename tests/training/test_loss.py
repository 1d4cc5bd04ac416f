"""The micro-batch loss: masked LM mean plus the weighted CR loss."""

import pytest
import torch

from megatron_dmc.ops import compression_loss
from megatron_dmc.training.loss import LossSettings, micro_batch_loss


@pytest.mark.parametrize("weight", [1.0, 4.0])
def test_cr_loss_enters_with_its_weight_and_is_logged_unweighted(weight):
    loss_BS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask_BS = torch.tensor([[1, 1, 0], [1, 1, 1]])
    alpha_sum_B = torch.tensor([3.0, 9.0], requires_grad=True)
    settings = LossSettings(target_cr=2.0, decisions_per_sequence=30, cr_loss_weight=weight)
    loss, stats = micro_batch_loss(loss_BS, mask_BS, alpha_sum_B, settings)
    cr = compression_loss(alpha_sum_B.detach(), 30, 2.0)
    assert float(loss.detach()) == pytest.approx(18.0 / 5.0 + weight * float(cr))
    assert float(stats[2]) == pytest.approx(2 * float(cr))
    loss.backward()
    assert torch.allclose(alpha_sum_B.grad, torch.full((2,), -weight / (2 * 30)))
