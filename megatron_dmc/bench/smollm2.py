"""`python -m megatron_dmc.bench --preset smollm2`: the default model's decode, side by side.

SmolLM2-135M with its real weights (asset cache), fp32, one torch thread, process CPU
time. At each context: transformers `LlamaForCausalLM` with its dense DynamicCache, ours
vanilla and ours DMC (FORCED-RATE decisions, labelled, or a checkpoint's own) at the same
batch, and DMC at equal KV memory: the largest batch whose pages and window rings fit the
vanilla batch's KV bytes. With `--delay W` also DMC with a merge delay of W and DMS with a
window of W (FORCED): their exact rings (W tokens per stream, held besides the pages) are
counted in each row's KV bytes and paid from the equal-memory budget. Engines step in alternating round-robin order, so all see the
same machine load; the ratios are of those interleaved timings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megatron_dmc.bench.engines import Engine, ours, time_round_robin, transformers_dense
from megatron_dmc.bench.workloads import FilledDecode, as_dms, filled_decode, with_delay, with_mode
from megatron_dmc.inference import cache_stats
from megatron_dmc.inference.model import LlamaForInference


@dataclass(frozen=True)
class Comparison:
    batch: int = 16
    """Batch of transformers, ours vanilla and the equal-batch DMC rows."""
    steps: int = 3
    """Timed decode steps per engine (after one untimed step)."""
    backend: str = "paged"
    """Our decode attention backend."""
    page_size: int = 16
    prefill_chunk: int = 512


def sequence_pages(run: FilledDecode, decode_tokens: int) -> int:
    """Pages the first sequence of `run` needs after `decode_tokens` more tokens (worst case:
    every stream appends each time)."""
    size = run.cache.config.page_size
    lengths_LG = run.cache.lengths_LBG[:, run.seq_ids_B[0]]
    return int((-(-(lengths_LG + decode_tokens) // size)).sum())


def equal_memory_batch(run: FilledDecode, budget_bytes: int, decode_tokens: int) -> tuple[int, int]:
    """(batch, pool pages): the most sequences like run's first that fit `budget_bytes` of
    KV, their window rings paid from the same budget."""
    cache = run.cache
    # window_state_bytes: DMC's window rings and the exact rings of a merge delay, all rows.
    ring_bytes = -(-cache_stats(cache).window_state_bytes // cache.config.max_batch)
    page_bytes = cache.pool.page_bytes
    batch = budget_bytes // (sequence_pages(run, decode_tokens) * page_bytes + ring_bytes)
    return int(batch), int((budget_bytes - batch * ring_bytes) // page_bytes)


def ours_filled(model, label, batch, prompt_1T, settings: Comparison, pages=None) -> FilledDecode:
    context = prompt_1T.shape[1]
    return filled_decode(model, batch, context, settings.steps + 1, num_pages=pages,
                         page_size=settings.page_size, chunk=settings.prefill_chunk,
                         prompt_B=prompt_1T)  # fmt: skip


def compare(
    vanilla: LlamaForInference,
    dmc: dict[str, LlamaForInference],
    hf_model,
    prompt_1T: torch.Tensor,
    settings: Comparison,
    log=print,
    equal_memory: bool = True,
) -> list[dict]:
    """Rows for one context: transformers dense (if hf_model), ours vanilla, and for each
    DMC model ({label: model in DMC mode}) equal batch and (if equal_memory) equal KV
    memory."""
    context, decode_tokens = prompt_1T.shape[1], settings.steps + 1
    engines: list[Engine] = []
    runs: dict[str, FilledDecode] = {}
    if hf_model is not None:
        engines.append(transformers_dense(hf_model, prompt_1T, settings.batch))
    base = ours_filled(vanilla, "vanilla", settings.batch, prompt_1T, settings)
    engines.append(ours("ours vanilla", base, settings.backend))
    runs["ours vanilla"] = base
    budget = settings.batch * sequence_pages(base, decode_tokens) * base.cache.pool.page_bytes
    for label, model in dmc.items():
        same = ours_filled(model, label, settings.batch, prompt_1T, settings)
        engines.append(ours(f"ours {label}, equal batch", same, settings.backend))
        runs[engines[-1].label] = same
        if not equal_memory:
            continue
        batch, pages = equal_memory_batch(same, budget, decode_tokens)
        wide = ours_filled(model, label, batch, prompt_1T, settings, pages)
        engines.append(ours(f"ours {label}, equal KV memory", wide, settings.backend))
        runs[engines[-1].label] = wide
        log(f"ctx {context}: {label} fits batch {batch} in the vanilla batch's "
            f"{budget / 2**20:.0f} MiB")  # fmt: skip
    time_round_robin(engines, settings.steps, time.process_time)
    rows = []
    for engine in engines:
        rows.append({"engine": engine.label, "context": context, "batch": engine.batch,
                     "step_ms": engine.step_ms, "tokens_per_s": engine.tokens_per_s,
                     "kv_mib": engine.kv_bytes() / 2**20, "budget_mib": budget / 2**20})  # fmt: skip
        if engine.label in runs:
            rows[-1]["cr"] = cache_stats(runs[engine.label].cache).compression_ratio
        log(f"ctx {context:5d} {engine.label:42s} B={engine.batch:3d} {engine.step_ms:8.1f} "
            f"ms/step {engine.tokens_per_s:7.1f} tok/s  KV {rows[-1]['kv_mib']:7.1f} MiB")  # fmt: skip
    return rows


def ratios(rows: list[dict], cr: float | None) -> list[str]:
    """The issue's goals as ratios of one context's interleaved rows."""
    by = {r["engine"]: r for r in rows}
    context = rows[0]["context"]
    hf, van = by.get("transformers dense"), by["ours vanilla"]
    lines = []
    if hf:
        lines.append(f"ctx {context}: ours vanilla {hf['step_ms'] / van['step_ms']:.2f}x "
                     "transformers dense per step (goal >= 1.5x at 2048)")  # fmt: skip
    for r in rows:
        if r["engine"].endswith("equal KV memory"):
            vs_van = r["tokens_per_s"] / van["tokens_per_s"]
            shown = f"ctx {context}: {r['engine']} (B={r['batch']}) {vs_van:.2f}x vanilla tok/s"
            row_cr = r.get("cr", cr)
            if row_cr:
                shown += f" = {vs_van / row_cr:.2f} x its CR {row_cr:.2f} (goal >= 0.9)"
            if hf:
                shown += (
                    f", {r['tokens_per_s'] / hf['tokens_per_s']:.2f}x transformers (goal >= 3.6)"
                )
            lines.append(shown)
        if r["engine"].endswith("equal batch"):
            lines.append(f"ctx {context}: {r['engine']} {van['step_ms'] / r['step_ms']:.2f}x "
                         "ours vanilla per step (goal >= 2.5x at 4096)")  # fmt: skip
    return lines


def delayed_models(vanilla, crs: list[float], delay: int) -> dict[str, LlamaForInference]:
    """{label: model}: DMC with a merge delay and DMS with a window of `delay`, FORCED."""
    if not delay:
        return {}
    rows = {}
    for cr in crs:
        rows[f"DMC FORCED {cr:g}x delay {delay}"] = with_delay(vanilla, float(cr), delay)
        rows[f"DMS FORCED {cr:g}x window {delay}"] = as_dms(vanilla, float(cr), delay)
    return rows


def run(args, log=print) -> dict:
    """The smollm2 preset: every context of args.contexts, one JSON for the run."""
    import json

    from megatron_dmc.assets.smollm2 import smollm2_hf_dir
    from megatron_dmc.bench.engines import load_transformers
    from megatron_dmc.bench.report import machine
    from megatron_dmc.bench.workloads import smollm2_model

    settings = Comparison(batch=args.batch, steps=args.steps, backend=args.backend)
    vanilla = smollm2_model()
    dmc = {f"DMC FORCED {cr:g}x": with_mode(vanilla, float(cr)) for cr in args.cr}
    dmc.update(delayed_models(vanilla, args.cr, args.delay))
    if args.model_dir:
        from megatron_dmc.inference.loading import load_model

        dmc["DMC trained decisions"] = load_model(args.model_dir, mode="dmc", dtype=torch.float32)
    hf = load_transformers(str(smollm2_hf_dir(verbose=False)))
    results = {"preset": "smollm2", "machine": machine(), "settings": vars(settings),
               "clock": "process CPU time, 1 torch thread", "rows": [], "ratios": []}  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_smollm2.json"
    with_hf = args.contexts if args.transformers_contexts is None else args.transformers_contexts
    wide = args.contexts if args.equal_memory_contexts is None else args.equal_memory_contexts
    for context in args.contexts:
        prompt_1T = torch.randint(0, vanilla.shape.vocab_size, (1, context), generator=gen)
        use_hf = hf if context in with_hf else None
        rows = compare(vanilla, dmc, use_hf, prompt_1T, settings, log, context in wide)
        results["rows"] += rows
        results["ratios"] += ratios(rows, args.cr[0] if len(args.cr) == 1 else None)
        path.write_text(json.dumps(results, indent=2))
    print("\n".join(["", "== ratios (interleaved in this run)", *results["ratios"]]))
    print(f"wrote {path}")
    return results
