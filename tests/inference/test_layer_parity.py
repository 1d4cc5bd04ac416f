"""One attention layer through the paged cache == the ops references (fp64)."""

from __future__ import annotations

import pytest
import torch

from megatron_dmc.ops import dmc_self_attention, dmc_sequential_reference, rope_cos_sin
from tests.inference.helpers import DMC, random_qkv, run_layer


def _references(q, k, v):
    cos, sin = rope_cos_sin(torch.arange(q.shape[2]), q.shape[-1], 10000.0, q.dtype)
    parallel, _ = dmc_self_attention(q, k, v, cos, sin, DMC, training=False)
    sequential, lengths = dmc_sequential_reference(q, k, v, cos, sin, DMC)
    return parallel, sequential, lengths


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (6, 1)])
def test_prefill_equals_parallel_form(heads, groups):
    q, k, v = random_qkv(2, heads, groups, 40, 8)
    parallel, _, ref_lengths = _references(q, k, v)
    out, cache = run_layer(q, k, v, torch.tensor([40, 40]), prefill_len=40)
    _close(out, parallel)
    assert torch.equal(cache.lengths_LBG[0], ref_lengths)


@pytest.mark.parametrize("backend", ["reference", "padded"])
@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2)])
def test_prefill_then_decode_equals_token_by_token(backend, heads, groups):
    q, k, v = random_qkv(2, heads, groups, 48, 8, seed=1)
    _, sequential, ref_lengths = _references(q, k, v)
    out, cache = run_layer(q, k, v, torch.tensor([48, 48]), prefill_len=17, backend=backend)
    _close(out, sequential)
    assert torch.equal(cache.lengths_LBG[0], ref_lengths)


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_equals_token_by_token(chunk):
    q, k, v = random_qkv(2, 4, 2, 45, 8, seed=2)
    _, sequential, ref_lengths = _references(q, k, v)
    out, cache = run_layer(q, k, v, torch.tensor([45, 45]), prefill_len=45, chunk=chunk)
    _close(out, sequential)
    assert torch.equal(cache.lengths_LBG[0], ref_lengths)


def test_ragged_batch_matches_each_sequence_alone():
    q, k, v = random_qkv(3, 4, 2, 40, 8, seed=3)
    lengths = torch.tensor([40, 23, 9])
    out, cache = run_layer(q, k, v, lengths, prefill_len=14, chunk=6, page_size=3)
    for b, n in enumerate(lengths.tolist()):
        _, sequential, ref_lengths = _references(
            q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n]
        )
        _close(out[b : b + 1, :, :n], sequential)
        assert torch.equal(cache.lengths_LBG[0, b], ref_lengths[0])
