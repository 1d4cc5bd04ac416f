"""The benchmark's cheap batch fill (one prompt copied to every row) and the step profile."""

from __future__ import annotations

import torch

from megatron_dmc.bench.profile import STAGES, profile_decode
from megatron_dmc.bench.workloads import filled_decode
from megatron_dmc.inference.attention import paged_attention_reference
from tests.inference.model_helpers import tiny_model


def test_copied_rows_hold_the_first_rows_cache_in_their_own_pages():
    torch.set_num_threads(1)
    run = filled_decode(tiny_model(), batch=3, context=37, steps=2, page_size=4)
    cache, seq = run.cache, run.seq_ids_B
    assert torch.equal(cache.lengths_LBG[:, seq[1]], cache.lengths_LBG[:, seq[0]])
    assert torch.equal(cache.ring_k_LBGWD[:, seq[2]], cache.ring_k_LBGWD[:, seq[0]])
    used = cache.block_table_LBGM[cache.block_table_LBGM >= 0]
    assert used.unique().numel() == used.numel()
    query = torch.randn(1, 4, 16).expand(3, -1, -1)
    out = paged_attention_reference(query, cache, 1, seq)
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)
    torch.testing.assert_close(out[2], out[0], rtol=0, atol=0)
    assert torch.equal(run.next_B, run.next_B[:1].expand(3))
    run.step("paged")
    assert bool((cache.seen_LB[:, seq] == 38).all())


def test_profile_reports_every_stage_within_the_step():
    torch.set_num_threads(1)
    result = profile_decode(tiny_model(), batch=2, context=20, steps=1, backend="paged")
    assert set(STAGES) < set(result) and result["step"] > 0 and result["cpu_ms_unprofiled"] > 0
    assert all(result[stage] > 0 for stage in STAGES)
    assert sum(result[stage] for stage in STAGES) <= result["step"] * 1.01
