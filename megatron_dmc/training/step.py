"""One optimizer step (or one evaluation batch) through Megatron-Core's pipeline schedules.

Legend: b micro-batch size, s sequence length, V vocabulary entries on this TP rank.

With a teacher, the step first runs the teacher over all micro-batches of the step (a
forward-only pass of the same schedule; its logits stay on the last pipeline stage), then
the student, whose last stage returns logits instead of per-token losses so that both the
cross-entropy and the KL to the teacher come from them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_dmc.compat import cpu_device_mode
from megatron_dmc.training.distill import vocab_parallel_kl
from megatron_dmc.training.loss import STATS, LossSettings, micro_batch_loss
from megatron_dmc.training.model_api import unpack_output
from megatron_dmc.training.optim import first_non_finite_grad
from megatron_dmc.training.teacher import Teacher


@dataclass
class StepResult:
    stats: dict[str, float]
    """Sums over the global batch (see loss.STATS), on every rank."""

    grad_norm: float | None = None
    """Global gradient norm before clipping (None when the step was skipped)."""

    bad_grad: str | None = None
    """Where the first non-finite gradient was (the update was then not applied)."""

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.stats.values())


def _forward_step(settings: LossSettings, teacher, data_iterator, model):
    """`teacher`: None, or (iterator over the teacher's logits, loss scale)."""
    batch = next(data_iterator)
    labels = None if teacher is not None else batch["labels"]
    output, sums = unpack_output(model(batch["tokens"], batch["position_ids"], None, labels=labels))
    if not parallel_state.is_pipeline_last_stage():
        return output, None
    if sums is not None:
        assert sums.count == settings.decisions_per_sequence, (sums.count, settings)
    alpha_sum_B = None if sums is None else sums.alpha_sum_B
    if teacher is None:
        return output, partial(_loss, batch["loss_mask"], alpha_sum_B, settings)
    teacher_bsV, scale = next(teacher[0]), teacher[1]
    module = getattr(model, "module", model)
    return output, partial(_distill_loss, batch, alpha_sum_B, settings, teacher_bsV, scale, module)


def _loss(loss_mask_BS, alpha_sum_B, settings, loss_BS):
    loss, stats = micro_batch_loss(loss_BS, loss_mask_BS, alpha_sum_B, settings)
    return loss, {"stats": stats}


def _distill_loss(batch, alpha_sum_B, settings, teacher_bsV, scale, module, logits_bsV):
    """Cross-entropy as the model computes it with labels, plus the KL to the teacher; the
    loss is scaled by `scale` (the chunk's share of the step's micro-batches)."""
    kl_bs = vocab_parallel_kl(logits_bsV, teacher_bsV)
    # Megatron's vocab-parallel cross-entropy works in place on its logits; the copy keeps
    # the student's logits intact (with b == 1 the transpose alone would share storage).
    logits_sbV = logits_bsV.transpose(0, 1).clone(memory_format=torch.contiguous_format)
    ce_bs = module.compute_language_model_loss(batch["labels"], logits_sbV)
    loss, stats = micro_batch_loss(ce_bs, batch["loss_mask"], alpha_sum_B, settings, kl_bs)
    return loss * scale if scale != 1.0 else loss, {"stats": stats}


def _holds_loss() -> bool:
    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )


def _reduce_stats(outputs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Sum the micro-batch statistics over data-parallel ranks and share them with every
    rank (so that all ranks can stop together on a bad loss)."""
    total = torch.zeros(len(STATS), dtype=torch.float64)
    if _holds_loss():
        for out in outputs:
            total += out["stats"].double().cpu()
    dist.all_reduce(total)
    return dict(zip(STATS, total.tolist()))


def run_batches(
    model: torch.nn.Module,
    data_iterator: Iterator[dict[str, torch.Tensor]],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    settings: LossSettings,
    forward_only: bool,
    teacher: Teacher | None = None,
) -> StepResult:
    """Forward (and backward unless `forward_only`) over one global batch.

    `seq_length` is what the pipeline schedule sends between stages (see
    `model_api.schedule_seq_length`). With a `teacher` (and a distillation weight) the
    KL to its logits joins the loss.
    """
    if teacher is not None and settings.distill_weight > 0:
        return _distilled_batches(
            model,
            data_iterator,
            (num_microbatches, seq_length, micro_batch_size),
            settings,
            teacher,
            forward_only,
        )
    with cpu_device_mode():
        outputs = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, settings, None),
            data_iterator=data_iterator,
            model=[model],
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
    return StepResult(_reduce_stats(outputs))


def _distilled_batches(
    model, data_iterator, shape: tuple[int, int, int], settings, teacher, forward_only: bool
) -> StepResult:
    """Teacher then student over each chunk of `teacher.chunk` micro-batches (0: the whole
    step). Gradients accumulate across chunks; Megatron's gradient finalisation (DP and
    tied-embedding all-reduces) runs after the last one only, and each chunk's losses are
    scaled by its share of the step, so any chunk size gives the step of one pass. `shape`:
    (micro-batches in the step, schedule sequence length, micro-batch size)."""
    num_microbatches, seq_length, micro_batch_size = shape
    chunk = teacher.chunk or num_microbatches
    config = model.config
    finalize = config.finalize_model_grads_func
    outputs: list = []
    try:
        for start in range(0, num_microbatches, chunk):
            size = min(chunk, num_microbatches - start)
            batches = [next(data_iterator) for _ in range(size)]
            logits = teacher.logits(model, batches, seq_length, micro_batch_size)
            last = start + size == num_microbatches
            config.finalize_model_grads_func = finalize if last else None
            step = partial(_forward_step, settings, (iter(logits), size / num_microbatches))
            with cpu_device_mode():
                outputs += get_forward_backward_func()(
                    forward_step_func=step,
                    data_iterator=iter(batches),
                    model=[model],
                    num_microbatches=size,
                    seq_length=seq_length,
                    micro_batch_size=micro_batch_size,
                    forward_only=forward_only,
                )
    finally:
        config.finalize_model_grads_func = finalize
    return StepResult(_reduce_stats(outputs))


def train_step(
    model: torch.nn.Module,
    optimizer: Any,
    data_iterator: Iterator[dict[str, torch.Tensor]],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    settings: LossSettings,
    teacher: Teacher | None = None,
) -> StepResult:
    """Zero grads, forward/backward over the global batch (Megatron syncs DP and tied
    embedding grads), then clip and step; a non-finite loss or gradient (on any rank) skips
    the update."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    result = run_batches(
        model,
        data_iterator,
        num_microbatches,
        seq_length,
        micro_batch_size,
        settings,
        False,
        teacher,
    )
    if result.finite:
        result.bad_grad = first_non_finite_grad(model)
    if result.finite and result.bad_grad is None:
        with cpu_device_mode():
            _, result.grad_norm, _ = optimizer.step()
    return result
