"""The distillation KL: DMS's direction, exact zero at student == teacher, its hand-written
gradient against autograd of the plain formula, and the vocabulary-parallel form at TP=2
against one process.

Legend: b batch, s sequence, V vocabulary (this rank's slice under TP).
"""

from __future__ import annotations

import pytest
import torch

from megatron_dmc.distributed import destroy_distributed, initialize_distributed
from megatron_dmc.training.distill import vocab_parallel_kl
from tests.dist_utils import run_distributed

VOCAB = 37 * 2


@pytest.fixture(scope="module")
def world_of_one():
    initialize_distributed(seed=3)
    yield
    destroy_distributed()


def _logits(seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student, teacher, upstream gradient) with full vocabulary."""
    g = torch.Generator().manual_seed(seed)
    student_bsV = torch.randn(2, 5, VOCAB, generator=g, dtype=torch.float64) * 3
    teacher_bsV = student_bsV + torch.randn(2, 5, VOCAB, generator=g, dtype=torch.float64)
    upstream_bs = torch.rand(2, 5, generator=g, dtype=torch.float64)
    return student_bsV.to(dtype), teacher_bsV.to(dtype), upstream_bs.to(dtype)


def _plain_kl(student_bsV: torch.Tensor, teacher_bsV: torch.Tensor) -> torch.Tensor:
    """Σ p_s (log p_s − log p_t), by autograd-able torch ops."""
    log_p_bsV = torch.log_softmax(student_bsV, dim=-1)
    log_q_bsV = torch.log_softmax(teacher_bsV, dim=-1)
    return (log_p_bsV.exp() * (log_p_bsV - log_q_bsV)).sum(dim=-1)


def _reference(seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    student_bsV, teacher_bsV, upstream_bs = _logits(seed, dtype)
    student_bsV.requires_grad_(True)
    kl_bs = _plain_kl(student_bsV, teacher_bsV)
    (kl_bs * upstream_bs).sum().backward()
    return kl_bs.detach(), student_bsV.grad


def test_kl_is_exactly_zero_with_zero_gradient_when_student_equals_teacher(world_of_one):
    student_bsV = _logits(0, torch.float32)[0].requires_grad_(True)
    kl_bs = vocab_parallel_kl(student_bsV, student_bsV.detach().clone())
    assert torch.equal(kl_bs, torch.zeros_like(kl_bs))
    kl_bs.sum().backward()
    assert torch.equal(student_bsV.grad, torch.zeros_like(student_bsV))


def test_kl_and_its_gradient_equal_the_plain_formula_in_fp64(world_of_one):
    want_kl, want_grad = _reference(1)
    student_bsV, teacher_bsV, upstream_bs = _logits(1)
    student_bsV.requires_grad_(True)
    kl_bs = vocab_parallel_kl(student_bsV, teacher_bsV)
    (kl_bs * upstream_bs).sum().backward()
    assert (kl_bs - want_kl).abs().max() <= 1e-12 * want_kl.abs().max()
    assert (student_bsV.grad - want_grad).abs().max() <= 1e-12 * want_grad.abs().max()
    reverse = _plain_kl(teacher_bsV, student_bsV.detach())
    assert (kl_bs.detach() - reverse).abs().max() > 1e-3  # the direction matters, and is s || t


def test_mismatched_vocabularies_are_refused(world_of_one):
    student_bsV, teacher_bsV, _ = _logits(2)
    with pytest.raises(ValueError, match="vocabulary"):
        vocab_parallel_kl(student_bsV, teacher_bsV[..., :-1])


def _tp2_kl(seed: int) -> dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]]:
    from megatron.core import parallel_state

    initialize_distributed(tensor_model_parallel_size=2)
    rank = parallel_state.get_tensor_model_parallel_rank()
    part = slice(rank * VOCAB // 2, (rank + 1) * VOCAB // 2)
    out = {}
    for dtype in (torch.float32, torch.float64):
        student_bsV, teacher_bsV, upstream_bs = _logits(seed, dtype)
        student_bsV = student_bsV[..., part].clone().requires_grad_(True)
        kl_bs = vocab_parallel_kl(student_bsV, teacher_bsV[..., part].clone())
        (kl_bs * upstream_bs).sum().backward()
        out[dtype] = (kl_bs.detach(), student_bsV.grad)
    return out


@pytest.mark.slow
@pytest.mark.dist
def test_vocab_parallel_kl_at_tp2_equals_one_process():
    """fp64: against the plain formula (<= 1e-12, the parallel maths); fp32: against the
    single process's fused log-softmax within fp32 rounding (<= 1e-5: the log-probabilities
    of these logits reach -30, so each carries about 2e-6 of rounding, as any fp32 KL does)."""
    results = run_distributed(_tp2_kl, 2, args=(4,), timeout_s=180)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        want_kl, want_grad = _reference(4, dtype)
        for out in results:
            kl_bs = out[dtype][0]
            assert (kl_bs - want_kl).abs().max() <= tolerance * want_kl.abs().max(), dtype
        grad_bsV = torch.cat([out[dtype][1] for out in results], dim=-1)
        assert (grad_bsV - want_grad).abs().max() <= tolerance * want_grad.abs().max(), dtype


@pytest.mark.parametrize("batch", [1, 2])
def test_distill_loss_reads_the_student_logits_before_the_in_place_cross_entropy(
    world_of_one, batch: int
):
    """Megatron's vocab-parallel cross-entropy overwrites its logits; with one sequence per
    micro-batch the [b, s] -> [s, b] transpose shares their storage, so the KL must not
    read them afterwards (it did: KL ~8 nats at step 0 on SmolLM2)."""
    from types import SimpleNamespace

    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_dmc.training.loss import STATS, LossSettings
    from megatron_dmc.training.step import _distill_loss

    g = torch.Generator().manual_seed(batch)
    student_bsV = torch.randn(batch, 6, VOCAB, generator=g)
    teacher_bsV = student_bsV + 0.1 * torch.randn(batch, 6, VOCAB, generator=g)
    labels_bs = torch.randint(0, VOCAB, (batch, 6), generator=g)
    want_kl = float(_plain_kl(student_bsV.double(), teacher_bsV.double()).sum())

    def cross_entropy(labels_bs, logits_sbV):
        return vocab_parallel_cross_entropy(logits_sbV, labels_bs.T.contiguous()).transpose(0, 1)

    module = SimpleNamespace(compute_language_model_loss=cross_entropy)
    batch_dict = {"labels": labels_bs, "loss_mask": torch.ones(batch, 6)}
    settings = LossSettings(None, 1, distill_weight=1.0)
    _, out = _distill_loss(batch_dict, None, settings, teacher_bsV, 1.0, module, student_bsV)
    got_kl = float(out["stats"][STATS.index("kl_sum")])
    assert got_kl == pytest.approx(want_kl, rel=1e-4)
