"""Decode's fused projection (q, k, v and the decision heads in one matmul) == the separate
projections (fp64 <= 1e-10), kept current when weights change; decode through it == the
full forward (fp32 <= 1e-5)."""

from __future__ import annotations

import pytest
import torch

from megatron_dmc.ops import DMCConfig, dms_config
from tests.inference.model_helpers import tiny_model
from tests.inference.test_model_parity import _cached_logits, _rel_err

HEADS = DMCConfig(decision_source="heads", merge_delay=4)


@pytest.mark.parametrize("dmc", [None, DMCConfig(), HEADS, dms_config(6)])
def test_fused_outputs_equal_separate_projections(dmc):
    model = tiny_model(dmc if dmc is not None else False, heads=4, groups=2).double()
    attn = model.model.layers[1].self_attn
    x_BTE = torch.randn(3, 1, model.shape.hidden_size, dtype=torch.float64)
    q, k, v, logits = attn.fused(attn, x_BTE)
    for got, want in zip((q, k, v), attn.qkv(x_BTE), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    expected = attn.decisions(x_BTE)
    assert (logits is None) == (expected is None)
    if expected is not None:
        torch.testing.assert_close(logits.alpha_BGT, expected.alpha_BGT, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(logits.omega_BGT, expected.omega_BGT, rtol=1e-10, atol=1e-10)


def test_fused_weight_follows_weight_updates():
    model = tiny_model(HEADS, heads=4, groups=2)
    attn = model.model.layers[0].self_attn
    x_BTE = torch.randn(2, 1, model.shape.hidden_size)
    attn.fused(attn, x_BTE)
    with torch.no_grad():
        attn.dmc_decision_proj.weight.add_(1.0)
        attn.k_proj.weight.mul_(2.0)
    _, k, _, logits = attn.fused(attn, x_BTE)
    torch.testing.assert_close(k, attn.qkv(x_BTE)[1])
    torch.testing.assert_close(logits.alpha_BGT, attn.decisions(x_BTE).alpha_BGT)


@pytest.mark.parametrize("dmc", [HEADS, dms_config(5)])
def test_decode_through_fused_projection_equals_full_forward(dmc):
    model = tiny_model(dmc, heads=4, groups=2, seed=4)
    tokens = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(4))
    logits, _ = _cached_logits(model, tokens, torch.tensor([30, 30]), 7, backend="paged")
    assert _rel_err(logits[:, 6:], model(tokens)[:, 6:]) <= 1e-5
