"""Decode's query RoPE through per-step tables == ops.apply_rope and
ops.rope_without_decision_channel (equal values; only the sign of a zero may differ)."""

from __future__ import annotations

import pytest
import torch

from megatron_dmc.inference.query_rope import query_tables, rotate_query
from megatron_dmc.ops import apply_rope, rope_cos_sin, rope_without_decision_channel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [8, 64])
def test_rotate_query_equals_ops(dtype, dim):
    gen = torch.Generator().manual_seed(0)
    q = 10 * torch.randn(5, 6, dim, generator=gen, dtype=dtype)
    q[..., -1] = 1e4  # a decision logit must not leak into channel mode's output
    cos, sin = rope_cos_sin(torch.randint(0, 4000, (5,), generator=gen), dim, 10000.0, dtype)
    plain = rotate_query(q, query_tables(cos, sin, without_decision_channel=False))
    assert torch.equal(plain, apply_rope(q, cos[:, None], sin[:, None]))
    channel = rotate_query(q, query_tables(cos, sin, without_decision_channel=True))
    assert torch.equal(channel, rope_without_decision_channel(q, cos[:, None], sin[:, None]))
    assert not bool(channel[..., -1].any())
