"""The output layer's gradient in the layout its backward can fold into one matrix product.

Legend: S sequence, B micro-batch, V vocabulary (this rank's part), C hidden size.

Without labels Megatron's GPT model returns its logits as `logits_SBV.transpose(0, 1)
.contiguous()`, so the gradient a distillation loss sends back reaches the output layer as
the transpose of a [B, S, V] tensor. With B == 1 that tensor counts as contiguous, but its
strides are not the standard ones, and `grad_output.matmul(weight)` in the layer's backward
(Megatron's `LinearWithFrozenWeight` and the trainable linear alike) then does not fold
[S, B, V] to [S*B, V]: it runs S matrix-vector products that each read the whole [V, C]
weight (measured at S = 256 with SmolLM2's vocabulary: 2.5 s a step instead of about 20 ms
for one product). `standard_output_grad` hands the layer a standard-strided copy of such a
gradient (a tensor hook on the layer's output); a gradient that already has standard
strides passes unchanged. Same values.
"""

from __future__ import annotations

import torch


def _standard_strides(x: torch.Tensor) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def restride(grad: torch.Tensor) -> torch.Tensor:
    """grad itself when its strides are standard, else a standard-strided copy."""
    if grad.stride() == _standard_strides(grad):
        return grad
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device).copy_(grad)


def _hook(module: torch.nn.Module, inputs, output) -> None:
    # A hook on the output tensor fires with the gradient the layer's backward receives,
    # also when a loss later works on that tensor in place (Megatron's cross-entropy).
    logits = output[0] if isinstance(output, tuple) else output
    if isinstance(logits, torch.Tensor) and logits.requires_grad:
        logits.register_hook(restride)


def standard_output_grad(module: torch.nn.Module) -> None:
    """Restride the gradient of `module.output_layer`'s output (if this stage has one)."""
    output_layer = getattr(module, "output_layer", None)
    if output_layer is not None:
        output_layer.register_forward_hook(_hook)
