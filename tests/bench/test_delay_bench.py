"""The bench with a merge delay: the batch fill copies the exact ring, and the delayed DMC
and DMS rows pay their rings from the KV bytes and the equal-memory budget."""

from __future__ import annotations

import pytest
import torch

from megatron_dmc.bench.smollm2 import (
    Comparison,
    compare,
    delayed_models,
    equal_memory_batch,
    ours_filled,
    sequence_pages,
)
from megatron_dmc.bench.workloads import as_dms, filled_decode, with_delay
from megatron_dmc.inference import cache_stats
from tests.inference.model_helpers import tiny_model


@pytest.mark.parametrize("make", [with_delay, as_dms])
def test_copied_rows_hold_the_first_rows_exact_ring(make):
    torch.set_num_threads(1)
    run = filled_decode(make(tiny_model(), 4.0, 6), batch=3, context=37, steps=2, page_size=4)
    cache, seq = run.cache, run.seq_ids_B
    exact = cache.exact
    for ring in (exact.k_LBGWD, exact.v_LBGWD, exact.alpha_LBGW, exact.omega_LBGW):
        assert torch.equal(ring[:, seq[2]], ring[:, seq[0]])
    assert bool(exact.k_LBGWD[:, seq[0]].abs().sum() > 0)
    run.step("paged")
    run.step("blocked")
    assert bool((run.next_B == run.next_B[0]).all()), "copied rows decode like the first"
    assert cache_stats(cache).compression_ratio > 1.5


def test_dms_view_shares_the_weights_and_starts_with_zero_heads():
    model = tiny_model()
    dms = as_dms(model, 2.0, 5)
    attn, base = dms.model.layers[0].self_attn, model.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == base.q_proj.weight.data_ptr()
    assert bool((attn.dmc_decision_proj.weight == 0).all())
    assert dms.dmc.kv_method == "dms" and dms.dmc.merge_delay == 5


def test_delayed_rows_pay_their_rings_from_the_budget():
    torch.set_num_threads(1)
    vanilla = tiny_model(seed=1)
    models = delayed_models(vanilla, [4.0], 8)
    assert list(models) == ["DMC FORCED 4x delay 8", "DMS FORCED 4x window 8"]
    prompt_1T = torch.randint(0, 97, (1, 120), generator=torch.Generator().manual_seed(0))
    settings = Comparison(batch=3, steps=2, page_size=4, prefill_chunk=64)
    rows = compare(vanilla, models, None, prompt_1T, settings, log=lambda _: None)
    by = {r["engine"]: r for r in rows}
    for label in models:
        wide = by[f"ours {label}, equal KV memory"]
        assert wide["batch"] > settings.batch and wide["kv_mib"] <= wide["budget_mib"]
        assert 1.5 < by[f"ours {label}, equal batch"]["cr"] < 4.0, "the ring is kept exact"
    run = ours_filled(models["DMS FORCED 4x window 8"], "dms", 3, prompt_1T, settings)
    stats = cache_stats(run.cache)
    ring_bytes = run.cache.exact.nbytes() // 3
    assert stats.window_state_bytes >= run.cache.exact.nbytes()
    page_bytes = run.cache.pool.page_bytes
    budget = 10 * sequence_pages(run, 3) * page_bytes
    batch, pages = equal_memory_batch(run, budget, 3)
    assert batch * (sequence_pages(run, 3) * page_bytes + ring_bytes) <= budget
    assert ring_bytes > 0 and batch < 10, "the rings cost sequences (pages alone fit 10)"
    assert pages * page_bytes + batch * ring_bytes <= budget
