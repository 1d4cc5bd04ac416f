"""Shared pieces of the model tests: a fixed batch, a schedule step, weights by global name.

Legend: B batch, S sequence.
"""

from __future__ import annotations

import re
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_dmc.compat import cpu_device_mode
from megatron_dmc.model import DMCGPTModel, pipeline_seq_length
from megatron_dmc.ops import compression_loss

MICRO_BATCH = 2
SEQ = 16
TARGET_CR = 4.0


def batch_BS(num_microbatches: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num_microbatches * MICRO_BATCH, SEQ), generator=generator)


def _loss_func(sums, output_tensor):
    lm_loss = output_tensor.float().mean()
    loss = lm_loss
    if sums is not None:
        loss = loss + compression_loss(sums.alpha_sum_B, sums.count, TARGET_CR)
    stats = {
        "loss": loss.detach().clone(),
        "alpha_sum": None if sums is None else sums.alpha_sum_B.detach(),
    }
    return loss, stats


def _forward_step(data_iterator, model):
    tokens_BS = next(data_iterator)
    position_ids_BS = torch.arange(tokens_BS.shape[1]).expand_as(tokens_BS)
    output = model(tokens_BS, position_ids_BS, None, labels=tokens_BS)
    output, sums = output if isinstance(output, tuple) else (output, None)
    return output, partial(_loss_func, sums)


def run_step(model, tokens_BS: torch.Tensor, step: int = 0) -> list[dict]:
    """Forward and backward over MICRO_BATCH-sized microbatches with the Megatron schedule."""
    inner = model.module if hasattr(model, "module") else model
    if isinstance(inner, DMCGPTModel):
        inner.collector.start_step(step)
    num_microbatches = tokens_BS.shape[0] // MICRO_BATCH
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    with cpu_device_mode():
        return get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=iter(tokens_BS.split(MICRO_BATCH)),
            model=[model],
            num_microbatches=num_microbatches,
            seq_length=pipeline_seq_length(SEQ, pp) if isinstance(inner, DMCGPTModel) else SEQ,
            micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )


def _global_names(model: torch.nn.Module) -> dict[str, str]:
    offsets = {}
    decoder = getattr(model, "decoder", None)
    for i, layer in enumerate(decoder.layers if decoder is not None else []):
        offsets[str(i)] = str(layer.layer_number - 1)
    pattern = re.compile(r"^decoder\.layers\.(\d+)\.")
    return {
        name: pattern.sub(lambda m: f"decoder.layers.{offsets[m.group(1)]}.", name)
        for name, _ in model.named_parameters()
    }


def local_slice(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This TP rank's shard of a full tensor, as Megatron's CPU initialisation cuts it."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, param.partition_stride
    rank = parallel_state.get_tensor_model_parallel_rank()
    world = parallel_state.get_tensor_model_parallel_world_size()
    chunks = torch.split(full, param.shape[dim] // stride, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


@torch.no_grad()
def load_full_state(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    names = _global_names(model)
    for name, param in model.named_parameters():
        param.copy_(local_slice(param, full[names[name]]))


def grads_by_global_name(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = _global_names(model)
    out = {}
    for name, param in model.named_parameters():
        grad = getattr(param, "main_grad", None)
        out[names[name]] = (grad if grad is not None else param.grad).detach().clone()
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
