"""The output layer's gradient reaches its backward with standard strides (one folded
matrix product), with unchanged values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megatron_dmc.model.grad_layout import restride, standard_output_grad


def test_restride_gives_a_transposed_gradient_standard_strides_and_keeps_its_values() -> None:
    grad_SBV = torch.randn(1, 256, 50).transpose(0, 1)  # what Megatron's transpose hands back
    assert grad_SBV.is_contiguous() and grad_SBV.stride() == (50, 12800, 1)
    fixed = restride(grad_SBV)
    assert fixed.stride() == (50, 50, 1) and torch.equal(fixed, grad_SBV)
    standard = torch.randn(256, 1, 50)
    assert restride(standard) is standard


class _Layer(nn.Module):
    """Returns (output, bias) like Megatron's parallel linears."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(50, 8))

    def forward(self, x):
        return x @ self.weight.t(), None


@pytest.mark.parametrize("in_place", [False, True])
def test_hooked_output_layer_gives_the_same_gradients(in_place) -> None:
    """Also when the loss works on the logits in place (Megatron's cross-entropy)."""
    grads = []
    for hooked in (False, True):
        torch.manual_seed(0)
        model = nn.Module()
        model.output_layer = _Layer()
        if hooked:
            standard_output_grad(model)
        x = torch.randn(256, 1, 8, requires_grad=True)
        logits_SBV = model.output_layer(x)[0]
        if in_place:
            (logits_SBV.sub_(1.0).exp() * torch.arange(50)).sum().backward()
        else:
            (logits_SBV.transpose(0, 1).contiguous().log_softmax(-1)[..., 0]).sum().backward()
        grads.append((x.grad, model.output_layer.weight.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)
