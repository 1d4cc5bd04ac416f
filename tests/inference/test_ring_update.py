"""The in-place ring merge (ring_update.py) == window.merge_step, through PagedKVCache.append:
rings, run lengths, pages and lengths after many decode tokens (fp32 <= 1e-5, fp64 <= 1e-10)."""

from __future__ import annotations

import pytest
import torch

from megatron_dmc.ops import rope_cos_sin
from tests.inference.helpers import make_cache

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _decode_tokens(cache, seq_ids, steps, seed=0):
    """Random keys, values, importances and decisions (long runs included) for `steps` tokens."""
    gen = torch.Generator().manual_seed(seed)
    batch, groups, dim = seq_ids.numel(), cache.config.num_kv_heads, cache.config.head_dim
    dtype = cache.config.dtype
    for step in range(steps):
        k, v = (torch.randn(batch, groups, dim, generator=gen, dtype=dtype) for _ in range(2))
        omega = torch.rand(batch, groups, generator=gen, dtype=dtype)
        alpha = torch.rand(batch, groups, generator=gen) < (0.5 if step < 30 else 0.97)
        cos, sin = rope_cos_sin(torch.full((batch,), step), dim, 10000.0, dtype)
        cache.append(0, seq_ids, k, v, alpha, omega, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seq", [[0, 1, 2], [3, 0, 2]])
@pytest.mark.parametrize(("channel", "window"), [(True, 12), (False, 12), (False, 1)])
def test_in_place_merge_equals_merge_step(dtype, seq, channel, window):
    """Channel and heads mode with the paper's window, and DMS's one-token slots (window 1)."""
    caches = []
    for in_place in (False, True):
        cache = make_cache(4, 2, 8, 80, page_size=4, dtype=dtype, decision_channel=channel,
                           window=window)  # fmt: skip
        cache.add_sequences(4)
        cache.merge_in_place = in_place
        cache.fused_append = False  # the torch path (the compiled one: test_cache_append.py)
        _decode_tokens(cache, torch.tensor(seq), steps=70)
        caches.append(cache)
    plain, fast = caches
    for name in ("lengths_LBG", "run_len_LBG", "block_table_LBGM", "seen_LB"):
        assert torch.equal(getattr(plain, name), getattr(fast, name)), name
    pairs = [(plain.ring_k_LBGWD, fast.ring_k_LBGWD), (plain.ring_v_LBGWD, fast.ring_v_LBGWD),
             (plain.ring_w_LBGW, fast.ring_w_LBGW), (plain.pool.k_flat, fast.pool.k_flat),
             (plain.pool.v_flat, fast.pool.v_flat)]  # fmt: skip
    assert int((plain.run_len_LBG > window).sum()) > 0  # runs beyond the window
    for expected, actual in pairs:
        error = float((actual - expected).abs().max() / expected.abs().max())
        assert error <= TOLERANCE[dtype], error
