"""The benchmark runs end to end on a tiny preset, labels forced decisions, and its
memory numbers come from the real page pool."""

from __future__ import annotations

import dataclasses
import json

import torch

from megatron_dmc.bench import __main__ as bench
from megatron_dmc.bench.presets import PRESETS
from megatron_dmc.schema.llama import LlamaShape

TINY = LlamaShape(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
)  # fmt: skip


def test_bench_writes_json_and_png_with_real_memory_ratios(tmp_path, monkeypatch):
    preset = dataclasses.replace(
        PRESETS["quick"], name="tiny", shape=TINY, crs=(4.0,), contexts=(64,), steps=2, warmup=1,
        memory_context=64, prefill_tokens=24, hf_contexts=(16,), page_size=4, prefill_chunk=16,
        prefill_modes=(4.0,),
    )  # fmt: skip
    monkeypatch.setitem(PRESETS, "quick", preset)
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--quick", "--out", str(tmp_path), "--skip", "d"])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "bench_tiny.json").read_text())
    assert (tmp_path / "bench_tiny.png").stat().st_size > 0
    assert "FORCED-RATE" in saved["decisions"]
    vanilla, dmc = saved["equal_batch"]
    assert dmc["compression_ratio"] > 3.5
    assert dmc["kv_allocated_bytes"] < 0.35 * vanilla["kv_allocated_bytes"]
    base, more = saved["equal_memory"]
    assert more["batch"] >= 2 * base["batch"]
    assert more["pool_bytes"] + more["window_state_bytes"] <= base["pool_bytes"]
    assert len(results["headline"]) >= 3


def test_bench_with_a_dmc_checkpoint_uses_its_own_decisions(tmp_path, monkeypatch):
    from tests.inference.model_helpers import tiny_model
    from tests.inference.test_loading import DMC_FIELDS, _save

    path = _save(tiny_model(), tmp_path / "m", DMC_FIELDS)
    preset = dataclasses.replace(
        PRESETS["quick"], name="tiny", contexts=(48,), steps=2, warmup=1, memory_context=48,
        memory_batch=2, prefill_tokens=16, page_size=4, prefill_chunk=None,
    )  # fmt: skip
    monkeypatch.setitem(PRESETS, "quick", preset)
    threads = torch.get_num_threads()
    try:
        argv = ["--quick", "--out", str(tmp_path), "--skip", "d", "--model-dir", str(path)]
        results = bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert "own decisions" in results["decisions"]
    modes = [row["mode"] for row in results["equal_batch"]]
    assert modes == ["vanilla", "dmc-model-decisions"]
    assert results["equal_batch"][1]["compression_ratio"] > 1.1
    assert [row["mode"] for row in results["equal_memory"]] == modes
