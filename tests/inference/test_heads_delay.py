"""Decision heads and delayed merging through the paged cache == the ops references (fp64)."""

from __future__ import annotations

import pytest
import torch

from megatron_dmc.ops import DecisionLogits, DMCConfig, dmc_sequential_reference, rope_cos_sin
from tests.inference.helpers import INIT_VALUE, random_qkv, run_layer


def _head_logits(batch, groups, length, seed=0) -> DecisionLogits:
    """Random decision-head logits: about half of the tokens merge, varied importance."""
    gen = torch.Generator().manual_seed(seed)
    alpha = torch.randn(batch, groups, length, generator=gen, dtype=torch.float64)
    omega = 3.0 * torch.randn(batch, groups, length, generator=gen, dtype=torch.float64)
    return DecisionLogits(alpha, omega)


def _sequential(q, k, v, dmc, logits):
    cos, sin = rope_cos_sin(torch.arange(q.shape[2]), q.shape[-1], 10000.0, q.dtype)
    return dmc_sequential_reference(q, k, v, cos, sin, dmc, logits)


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


CASES = [
    ("heads", 0, 17, None),
    ("heads", 0, 30, 7),
    ("channel", 5, 17, None),
    ("channel", 5, 3, None),
    ("heads", 4, 12, None),
    ("channel", 16, 40, None),
    ("channel", 5, 30, 7),
    ("heads", 6, 33, 4),
    ("channel", 16, 40, 3),
    ("heads", 3, 40, 1),
]


@pytest.mark.parametrize(("source", "delay", "prefill_len", "chunk"), CASES)
def test_prefill_then_decode_equals_sequential_reference(source, delay, prefill_len, chunk):
    dmc = DMCConfig(window_size=4, init_val=INIT_VALUE, decision_source=source, merge_delay=delay)
    q, k, v = random_qkv(2, 4, 2, 40, 8, seed=5)
    logits = _head_logits(2, 2, 40) if source == "heads" else None
    expected, ref_lengths = _sequential(q, k, v, dmc, logits)
    lengths = torch.tensor([40, 40])
    out, cache = run_layer(q, k, v, lengths, prefill_len, chunk, dmc=dmc, logits=logits)
    _close(out, expected)
    assert torch.equal(cache.slot_counts()[0], ref_lengths)
    assert int(ref_lengths.sum()) < 2 * 2 * 40  # decisions really merged


@pytest.mark.parametrize("delay", [0, 6])
def test_ragged_heads_batch_matches_each_sequence_alone(delay):
    dmc = DMCConfig(window_size=4, init_val=INIT_VALUE, decision_source="heads", merge_delay=delay)
    q, k, v = random_qkv(3, 4, 2, 30, 8, seed=6)
    logits = _head_logits(3, 2, 30, seed=1)
    lengths = torch.tensor([30, 17, 4])
    out, cache = run_layer(q, k, v, lengths, 10, dmc=dmc, logits=logits, page_size=3)
    for b, n in enumerate(lengths.tolist()):
        one = DecisionLogits(*(x[b : b + 1, :, :n] for x in logits))
        expected, ref_lengths = _sequential(
            q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], dmc, one
        )
        _close(out[b : b + 1, :, :n], expected)
        assert torch.equal(cache.slot_counts()[0, b], ref_lengths[0])


def test_heads_mode_needs_logits():
    dmc = DMCConfig(decision_source="heads")
    q, k, v = random_qkv(1, 2, 1, 6, 8)
    with pytest.raises(ValueError, match="heads"):
        run_layer(q, k, v, torch.tensor([6]), 6, dmc=dmc)
