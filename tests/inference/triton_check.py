"""Run under TRITON_INTERPRET=1 (see test_triton.py): Triton decode == reference, or exit 1."""

from __future__ import annotations

import sys

import torch

from megatron_dmc.inference.attention import paged_attention_reference
from megatron_dmc.inference.triton_decode import paged_attention_triton
from megatron_dmc.ops import DMCConfig
from tests.inference.helpers import INIT_VALUE, random_qkv, random_ring, run_layer


def check(heads: int, groups: int, head_dim: int, page_size: int, delay: int = 0) -> float:
    q, k, v = random_qkv(3, heads, groups, 30, head_dim, seed=heads + head_dim, dtype=torch.float32)
    dmc = DMCConfig(window_size=12, init_val=INIT_VALUE, merge_delay=delay)
    _, cache = run_layer(q, k, v, torch.tensor([30, 17, 5]), 11, page_size=page_size, dmc=dmc)
    seq = torch.arange(3)
    query = torch.randn(3, heads, head_dim)
    ring = None
    if delay:
        ring = random_ring(3, groups, delay, head_dim, torch.float32, [delay, 3, delay])
    expected = paged_attention_reference(query, cache, 0, seq, ring=ring)
    actual = paged_attention_triton(query, cache, 0, seq, ring=ring)
    return float((actual - expected).abs().max() / expected.abs().max())


if __name__ == "__main__":
    worst = max(
        check(4, 4, 8, 4),
        check(6, 2, 12, 8),
        check(3, 1, 16, 2),
        check(6, 2, 12, 4, delay=6),
        check(4, 4, 8, 2, delay=3),
    )
    print(f"max relative error {worst:.2e}")
    sys.exit(0 if worst <= 1e-5 else 1)
