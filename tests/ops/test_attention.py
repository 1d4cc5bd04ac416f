"""The memory-efficient biased attention equals the explicit reference, values and grads."""

import pytest
import torch

from megatron_dmc.ops import (
    HARD_MASK_VALUE,
    attention_bias,
    dmc_attention,
    dmc_attention_reference,
    windowed_partial_accumulation,
)


def _inputs(heads, groups, length, head_dim, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, length, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(2, groups, length, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(2, groups, length, head_dim, generator=gen, dtype=dtype)
    alpha = torch.rand(2, groups, length, generator=gen, dtype=dtype)
    return q, k, v, alpha


@pytest.mark.parametrize(("heads", "groups"), [(4, 4), (6, 3), (4, 1)])
@pytest.mark.parametrize("hard", [False, True])
def test_fast_equals_reference(heads, groups, hard):
    q, k, v, alpha = _inputs(heads, groups, 33, 8)
    alpha = (alpha > 0.5).to(alpha.dtype) if hard else alpha
    bias = attention_bias(alpha, hard=hard)
    fast = dmc_attention(q, k, v, bias)
    reference = dmc_attention_reference(q, k, v, bias)
    assert (fast - reference).abs().max() <= 1e-12 * reference.abs().max()


def test_fast_equals_reference_gradients():
    q, k, v, alpha = _inputs(6, 2, 19, 8, seed=1)
    grads = []
    for attention in (dmc_attention, dmc_attention_reference):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, alpha)]
        out = attention(*leaves[:3], attention_bias(leaves[3], hard=False))
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for fast_grad, reference_grad in zip(*grads):
        assert torch.allclose(fast_grad, reference_grad, rtol=1e-10, atol=1e-12)


def test_hard_bias_hides_merged_slots_exactly():
    q, k, v, _ = _inputs(2, 2, 6, 4)
    alpha = torch.zeros(2, 2, 6, dtype=torch.float64)
    alpha[..., 2] = 1.0  # token 2 merges into slot 1, so slot 1 is hidden from later queries
    bias = attention_bias(alpha, hard=True)
    assert bias[..., 1].eq(HARD_MASK_VALUE).all() and bias[..., [0, 2, 3, 4, 5]].eq(0).all()
    keep = torch.tensor([0, 2, 3, 4, 5])
    out = dmc_attention(q, k, v, bias)
    plain = dmc_attention(q[:, :, keep], k[:, :, keep], v[:, :, keep], bias[..., keep])
    assert torch.allclose(out[:, :, 2:], plain[:, :, 1:], rtol=1e-14, atol=1e-15)


def test_own_slot_is_always_visible():
    """Even when the next token merges into it, query i attends to its own partial slot."""
    q, k, v, _ = _inputs(1, 1, 5, 4)
    alpha = torch.ones(2, 1, 5, dtype=torch.float64)
    out = dmc_attention(q, k, v, attention_bias(alpha, hard=True))
    assert torch.allclose(out, v.expand_as(out), rtol=0, atol=1e-15)


def test_accumulation_gradcheck():
    gen = torch.Generator().manual_seed(3)
    shape = (1, 2, 9)
    k = torch.randn(*shape, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(*shape, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(*shape, generator=gen, dtype=torch.float64).requires_grad_()
    omega = (torch.rand(*shape, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *t: windowed_partial_accumulation(*t, window=4), (k, v, alpha, omega)
    )


def test_biased_attention_gradcheck():
    q, k, v, alpha = _inputs(4, 2, 7, 4, seed=5)
    leaves = [t.requires_grad_() for t in (q, k, v, alpha)]
    assert torch.autograd.gradcheck(
        lambda q, k, v, a: dmc_attention(q, k, v, attention_bias(0.9 * a, hard=False)), leaves
    )


def test_accumulation_matches_its_definition():
    """ktilde_t = sum_{s>t-W} prod_{m=s+1..t} alpha_m w_s k_s / sum(...), written out."""
    gen = torch.Generator().manual_seed(7)
    k = torch.randn(1, 1, 15, 2, generator=gen, dtype=torch.float64)
    alpha = torch.rand(1, 1, 15, generator=gen, dtype=torch.float64)
    omega = torch.rand(1, 1, 15, generator=gen, dtype=torch.float64) + 0.1
    ktilde, _ = windowed_partial_accumulation(k, k, alpha, omega, window=5)
    for t in range(15):
        num, den = torch.zeros(2, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for s in range(max(0, t - 4), t + 1):
            weight = alpha[0, 0, s + 1 : t + 1].prod() * omega[0, 0, s]
            num, den = num + weight * k[0, 0, s], den + weight
        assert torch.allclose(ktilde[0, 0, t], num / den, rtol=1e-13, atol=0)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize(("length", "window"), [(40, 12), (7, 12), (9, 1)])
def test_accumulation_equals_plain_autograd(dtype, tolerance, length, window):
    """The hand-written backward (and the padded forward) == plain autograd through shifted
    copies: outputs bitwise, gradients of k, v, alpha and omega to rounding."""
    from megatron_dmc.ops.accumulate import windowed_partial_accumulation_reference

    gen = torch.Generator().manual_seed(11)
    shape = (2, 3, length)
    leaves = [torch.randn(*shape, 8, generator=gen, dtype=dtype) for _ in range(2)]
    leaves += [
        torch.rand(*shape, generator=gen, dtype=dtype),
        torch.rand(*shape, generator=gen, dtype=dtype) + 0.1,
    ]
    grad_out = [torch.randn(*shape, 8, generator=gen, dtype=dtype) for _ in range(2)]
    results = []
    for fn in (windowed_partial_accumulation_reference, windowed_partial_accumulation):
        inputs = [x.clone().requires_grad_() for x in leaves]
        outs = fn(*inputs, window=window)
        torch.autograd.backward(outs, grad_out)
        results.append((outs, [x.grad for x in inputs]))
    (expected, expected_grads), (actual, grads) = results
    for e, a in zip(expected, actual):
        assert torch.equal(e, a)
    for e, a in zip(expected_grads, grads):
        if e is None:  # window 1: alpha does not reach the output
            assert a is None and window == 1
            continue
        # omega's gradient is rounding noise at window 1 (the slot is the token itself)
        assert float((a - e).abs().max() / e.abs().max().clamp_min(1.0)) <= tolerance
