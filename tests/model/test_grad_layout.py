"""The output layer's gradient reaches its backward with standard strides (one folded
matrix product), with unchanged values."""

from __future__ import annotations

import torch
from torch import nn

from megatron_dmc.model.grad_layout import _StandardGrad, standard_output_grad


def test_standard_grad_restrides_a_transposed_gradient_and_keeps_its_values() -> None:
    grad_SBV = torch.randn(1, 256, 50).transpose(0, 1)  # what Megatron's transpose hands back
    assert grad_SBV.is_contiguous() and grad_SBV.stride() == (50, 12800, 1)
    x = torch.randn(256, 1, 50, requires_grad=True)
    _StandardGrad.apply(x).backward(grad_SBV)
    assert x.grad.stride() == (50, 50, 1) and torch.equal(x.grad, grad_SBV)


class _Layer(nn.Module):
    """Returns (output, bias) like Megatron's parallel linears."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(50, 8))

    def forward(self, x):
        return x @ self.weight.t(), None


def test_hooked_output_layer_gives_the_same_gradients() -> None:
    grads = []
    for hooked in (False, True):
        torch.manual_seed(0)
        model = nn.Module()
        model.output_layer = _Layer()
        if hooked:
            standard_output_grad(model)
        x = torch.randn(256, 1, 8, requires_grad=True)
        logits_BSV = model.output_layer(x)[0].transpose(0, 1).contiguous()
        (logits_BSV.log_softmax(-1)[..., 0]).sum().backward()
        grads.append((x.grad, model.output_layer.weight.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)
