"""The four measurements of the benchmark; each returns plain rows for the report."""

from __future__ import annotations

from megatron_dmc.bench.hf_baseline import hf_decode_step_ms, hf_model
from megatron_dmc.bench.presets import Preset
from megatron_dmc.bench.workloads import (
    MODEL_DECISIONS,
    mode_name,
    parallel_prefill_s,
    run_decode,
    token_by_token_prefill_s,
)
from megatron_dmc.inference.model import LlamaForInference
from megatron_dmc.inference.pool import CacheFullError
from megatron_dmc.ops import DMCConfig

MODES_NOTE = "DMC rows use FORCED-RATE decisions (random weights), not a trained model's."
MODEL_NOTE = "DMC rows use the checkpoint's own decisions on random-token prompts."


def equal_batch(model: LlamaForInference, preset: Preset, log) -> list[dict]:
    """(a) Same batch and context: per-step decode latency and KV bytes, vanilla vs DMC."""
    rows = []
    for context in preset.contexts:
        base = run_decode(model, preset, None, preset.batch, context)
        for cr in (None, *preset.crs):
            run = base if cr is None else run_decode(model, preset, cr, preset.batch, context)
            row = run.as_dict() | {
                "speedup_vs_vanilla": base.step_ms / run.step_ms,
                "kv_bytes_vs_vanilla": run.kv_allocated_bytes / base.kv_allocated_bytes,
                "kv_peak_vs_vanilla": run.kv_peak_bytes / base.kv_peak_bytes,
            }
            rows.append(row)
            log(f"(a) ctx {context:5d} {run.mode:18s} {run.step_ms:8.2f} ms/step  "
                f"KV {row['kv_bytes_vs_vanilla']:.3f}x  peak {row['kv_peak_vs_vanilla']:.3f}x")  # fmt: skip
    return rows


def _sequence_cost(model, preset: Preset, mode, total: int) -> tuple[int, int, int]:
    """(page bytes, pages one sequence needs at full length, its window-ring bytes)."""
    shape, page = preset.shape, preset.page_size
    page_bytes = 2 * page * shape.head_dim * preset.dtype.itemsize
    streams = shape.num_hidden_layers * shape.num_key_value_heads
    ring_entry = 2 * shape.head_dim * preset.dtype.itemsize + 4
    ring = 0 if mode is None else streams * DMCConfig().window_size * ring_entry
    if mode == MODEL_DECISIONS:
        probe = run_decode(model, preset, mode, 1, preset.memory_context)
        growth = streams * -(-(total - preset.memory_context) // page)
        return page_bytes, probe.kv_allocated_bytes // page_bytes + growth, ring
    slots = total if mode is None else -(-total // mode) + 1
    return page_bytes, streams * -(-int(slots) // page), ring


def equal_memory(model: LlamaForInference, preset: Preset, log) -> list[dict]:
    """(b) One KV budget (the vanilla batch's pool): the largest batch that fits, tokens/s.

    DMC pays for its window rings out of the same budget. With the model's own decisions
    the batch is sized from one probe sequence's pages (other prompts may not fit: logged).
    """
    total = preset.memory_context + preset.warmup + preset.steps + 1
    page_bytes, vanilla_pages, _ = _sequence_cost(model, preset, None, total)
    budget = preset.memory_batch * vanilla_pages * page_bytes
    rows, base = [], None
    for mode in (None, *preset.crs):
        page_bytes, seq_pages, ring = _sequence_cost(model, preset, mode, total)
        batch = budget // (seq_pages * page_bytes + ring)
        pages = (budget - batch * ring) // page_bytes
        try:
            run = run_decode(model, preset, mode, batch, preset.memory_context, num_pages=pages)
        except CacheFullError as error:
            log(f"(b) {mode_name(mode)}: batch {batch} did not fit: {error}")
            continue
        base = base or run
        row = run.as_dict() | {
            "budget_bytes": budget,
            "throughput_vs_vanilla": run.tokens_per_s / base.tokens_per_s,
            "batch_vs_vanilla": run.batch / base.batch,
        }
        rows.append(row)
        log(f"(b) budget {budget / 2**20:.1f} MiB {run.mode:18s} batch {batch:4d} "
            f"{run.tokens_per_s:9.1f} tok/s  {row['throughput_vs_vanilla']:.2f}x")  # fmt: skip
    return rows


def prefill(model: LlamaForInference, preset: Preset, log) -> list[dict]:
    """(c) One prompt: parallel prefill vs filling the cache token by token."""
    rows = []
    for cr in preset.prefill_modes or (None, preset.crs[-1]):
        parallel = parallel_prefill_s(model, preset, cr, preset.prefill_tokens)
        sequential = token_by_token_prefill_s(model, preset, cr, preset.prefill_tokens)
        rows.append({"mode": mode_name(cr), "tokens": preset.prefill_tokens, "parallel_s": parallel,
                     "token_by_token_s": sequential, "speedup": sequential / parallel})  # fmt: skip
        log(f"(c) {preset.prefill_tokens} tokens {mode_name(cr):18s} parallel {parallel:.3f}s "
            f"token-by-token {sequential:.2f}s  {sequential / parallel:.1f}x")  # fmt: skip
    return rows


def hf_generate(model: LlamaForInference, preset: Preset, log) -> list[dict]:
    """(d) HF transformers generate (dense cache) vs this engine at the same batch/context."""
    hf = hf_model(model, preset)
    rows = []
    for context in preset.hf_contexts:
        hf_ms = hf_decode_step_ms(hf, preset, preset.batch, context)
        for cr in (None, preset.crs[-1]):
            ours = run_decode(model, preset, cr, preset.batch, context)
            rows.append({"context": context, "batch": preset.batch, "hf_step_ms": hf_ms,
                         "mode": ours.mode, "step_ms": ours.step_ms,
                         "speedup_vs_hf": hf_ms / ours.step_ms})  # fmt: skip
            log(f"(d) ctx {context:5d} HF dense {hf_ms:8.2f} ms/step  {ours.mode:18s} "
                f"{ours.step_ms:8.2f} ms/step  {hf_ms / ours.step_ms:.2f}x")  # fmt: skip
    return rows
