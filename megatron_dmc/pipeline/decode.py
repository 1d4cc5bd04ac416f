"""Decode throughput and KV bytes through the paged engine: vanilla vs each DMC export.

Same batch, same held-out prompts (`batch` disjoint slices of `context` tokens), greedy
decode; the DMC model uses its own learned decisions. Timing uses one torch thread and
process CPU time, as `megatron_dmc.bench` does on shared CPUs.

Legend: B sequences, T tokens, L layers, G KV heads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megatron_dmc.pipeline.preset import DecodeSettings


@dataclass
class DecodeResult:
    label: str
    batch: int
    context: int
    step_ms: float
    tokens_per_s: float
    prefill_s: float
    kv_allocated_bytes: int
    """Bytes of the pages the streams own after the last decode step."""
    kv_used_bytes: int
    """Bytes of the filled slots (allocated minus partly empty last pages)."""
    window_state_bytes: int
    """DMC window rings (0 for vanilla)."""
    compression_ratio: float
    """Tokens seen / slots kept over all layers, heads and sequences."""
    cr_per_head_LG: list[list[float]]

    def as_dict(self) -> dict:
        return asdict(self)


def prompts(token_ids: torch.Tensor, batch: int, context: int) -> torch.Tensor:
    """`batch` disjoint held-out slices of `context` tokens, [B, T]."""
    if token_ids.numel() < batch * context:
        raise ValueError(
            f"decode needs {batch} x {context} held-out tokens; the text has "
            f"{token_ids.numel()}: lower decode.batch or decode.context"
        )
    return token_ids[: batch * context].view(batch, context)


def measure(model, label: str, tokens_BT: torch.Tensor, settings: DecodeSettings) -> DecodeResult:
    """Prefill the prompts, run warm-up steps, then time `settings.steps` decode steps."""
    from megatron_dmc.bench.timing import timed
    from megatron_dmc.inference import PagedKVCache, cache_stats
    from megatron_dmc.inference.generation import default_num_pages

    batch, context = tokens_BT.shape
    total = context + settings.warmup + settings.steps + 1
    pages = default_num_pages(model, batch, total, settings.page_size)
    cache = PagedKVCache(model.cache_config(pages, batch, total, page_size=settings.page_size))
    seq_B = cache.add_sequences(batch)
    lengths_B = torch.full((batch,), context)
    logits, prefill_s = timed(
        lambda: model.prefill(tokens_BT, lengths_B, cache, seq_B, settings.prefill_chunk), "cpu"
    )
    next_B = logits.argmax(-1)
    for _ in range(settings.warmup):
        next_B = model.decode(next_B, cache, seq_B).argmax(-1)

    def steps() -> None:
        nonlocal next_B
        for _ in range(settings.steps):
            next_B = model.decode(next_B, cache, seq_B).argmax(-1)

    _, seconds = timed(steps, "cpu")
    stats = cache_stats(cache)
    return DecodeResult(
        label=label, batch=batch, context=context, step_ms=1e3 * seconds / settings.steps,
        tokens_per_s=batch * settings.steps / seconds, prefill_s=prefill_s,
        kv_allocated_bytes=stats.allocated_bytes, kv_used_bytes=stats.used_bytes,
        window_state_bytes=stats.window_state_bytes, compression_ratio=stats.compression_ratio,
        cr_per_head_LG=stats.cr_per_head_LG.tolist(),
    )  # fmt: skip


def run_decode(
    source_dir: str,
    exports: dict[str, Path],
    token_ids: torch.Tensor,
    settings: DecodeSettings,
) -> list[DecodeResult]:
    """Vanilla (the source model) first, then each export ({label: dir}) with its decisions."""
    from tqdm import tqdm

    from megatron_dmc.inference.loading import load_model

    tokens_BT = prompts(token_ids, settings.batch, settings.context)
    runs = [("vanilla", source_dir, "vanilla"), *((k, str(v), "dmc") for k, v in exports.items())]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = []
        for label, model_dir, mode in tqdm(runs, desc="decode", unit="model"):
            model = load_model(model_dir, mode=mode, dtype=torch.float32)
            results.append(measure(model, label, tokens_BT, settings))
    finally:
        torch.set_num_threads(threads)
    return results


def save_results(results: list[DecodeResult], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n")


def load_results(path: Path) -> list[DecodeResult]:
    return [DecodeResult(**item) for item in json.loads(Path(path).read_text())]
