"""Per-token KL(student || teacher) over vocabulary-parallel logits.

Legend: b micro-batch size, s sequence length, V vocabulary entries on this TP rank.

Each tensor-parallel rank holds a slice of the vocabulary. As in Megatron's
`vocab_parallel_cross_entropy`, the log-softmax is formed with two all-reduces over the TP
group (max and sum of the slices' exponentiated log-sum-exps) and the KL's sum over the
vocabulary with a third; the full vocabulary is never gathered. The direction is DMS's: Σ_v p_s (log p_s − log p_t),
no temperature. Its gradient with respect to the student logits is
p_s ⊙ ((log p_s − log p_t) − KL), computed from this rank's slice and the global KL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(tensor, op=op, group=parallel_state.get_tensor_model_parallel_group())
    return tensor


def vocab_parallel_log_softmax(logits_bsV: torch.Tensor) -> torch.Tensor:
    """log-softmax over the whole (TP-split) vocabulary of this rank's slice, in fp32 at
    least; no gradient. Under TP the slices' log-sum-exps combine by a max and a sum
    all-reduce of [b, s] tensors."""
    logits_bsV = logits_bsV.detach().to(torch.promote_types(logits_bsV.dtype, torch.float32))
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return torch.log_softmax(logits_bsV, dim=-1)
    lse_bs = torch.logsumexp(logits_bsV, dim=-1)
    max_bs = _all_reduce(lse_bs.clone(), dist.ReduceOp.MAX)
    lse_bs = max_bs + _all_reduce((lse_bs - max_bs).exp()).log()
    return logits_bsV - lse_bs[..., None]


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_bsV: torch.Tensor, teacher_bsV: torch.Tensor) -> torch.Tensor:
        log_p_bsV = vocab_parallel_log_softmax(student_bsV)
        diff_bsV = log_p_bsV - vocab_parallel_log_softmax(teacher_bsV)
        p_bsV = log_p_bsV.exp()
        kl_bs = _all_reduce((p_bsV * diff_bsV).sum(dim=-1))
        ctx.save_for_backward(p_bsV, diff_bsV, kl_bs)
        ctx.dtype = student_bsV.dtype
        return kl_bs

    @staticmethod
    def backward(ctx, grad_bs: torch.Tensor):
        p_bsV, diff_bsV, kl_bs = ctx.saved_tensors
        grad_bsV = grad_bs[..., None] * p_bsV * (diff_bsV - kl_bs[..., None])
        return grad_bsV.to(ctx.dtype), None


def vocab_parallel_kl(student_bsV: torch.Tensor, teacher_bsV: torch.Tensor) -> torch.Tensor:
    """Per-token KL(student || teacher) [b, s] in fp32 (fp64 for fp64 input), on every TP rank; gradient to the
    student logits only (the teacher is a constant)."""
    if student_bsV.shape != teacher_bsV.shape:
        raise ValueError(
            f"student logits {tuple(student_bsV.shape)} and teacher logits "
            f"{tuple(teacher_bsV.shape)} differ: the teacher must have the student's "
            "vocabulary and tensor-parallel split"
        )
    return _VocabParallelKL.apply(student_bsV, teacher_bsV)
