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


HEADLINE_FILE = "headline.json"
HEADLINE_PLOT = "headline.png"


def run_headline(
    source_dir: str,
    exports: dict[str, Path],
    token_ids: torch.Tensor,
    settings: DecodeSettings,
    out_dir: Path,
) -> list[dict]:
    """DMC at equal KV memory with its own decisions, beside equal batch, our vanilla and
    transformers' dense cache (megatron_dmc/bench/smollm2.py's comparison), per context.

    One held-out prompt per context (cut to the model's positions), its cache copied to
    every row; writes out_dir/headline.json and headline.png."""
    from megatron_dmc.bench.engines import load_transformers
    from megatron_dmc.bench.smollm2 import Comparison, compare
    from megatron_dmc.inference.loading import load_model

    comparison = Comparison(batch=settings.headline_batch, steps=settings.headline_steps,
                            page_size=settings.page_size,
                            prefill_chunk=settings.prefill_chunk or 512)  # fmt: skip
    vanilla = load_model(source_dir, mode="vanilla", dtype=torch.float32)
    dmc = {label: load_model(str(path), mode="dmc", dtype=torch.float32)
           for label, path in exports.items()}  # fmt: skip
    hf = load_transformers(source_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows: list[dict] = []
    try:
        longest = vanilla.shape.max_position_embeddings - settings.headline_steps - 2
        for context in sorted({min(c, longest) for c in settings.headline_contexts}):
            prompt_1T = prompts(token_ids, 1, context)
            rows += compare(vanilla, dmc, hf, prompt_1T, comparison, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / HEADLINE_FILE).write_text(json.dumps(rows, indent=2) + "\n")
    if rows:
        plot_headline(rows, out_dir / HEADLINE_PLOT)
    return rows


def plot_headline(rows: list[dict], path: Path) -> Path:
    """Decode tokens/s of every engine at each context, batch and KV MiB on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.5 * len(contexts), 4), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        mine = [r for r in rows if r["context"] == context]
        bars = ax.barh([r["engine"] for r in mine], [r["tokens_per_s"] for r in mine])
        for bar, r in zip(bars, mine):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f" B={r['batch']}, {r['kv_mib']:.0f} MiB", va="center", fontsize=7)  # fmt: skip
        ax.set(xlabel="decode tokens/s (process CPU time, 1 thread)",
               title=f"{context}-token context")  # fmt: skip
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def headline_section(root: Path) -> list[str]:
    """The report's headline section (markdown parts), or nothing if it was not run."""
    path = Path(root) / "decode" / HEADLINE_FILE
    rows = json.loads(path.read_text()) if path.is_file() else []
    if not rows:
        return []
    table = ["| context | engine | batch | ms / step | tokens/s | vs ours vanilla | "
             "vs transformers | KV MiB |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        same = [x for x in rows if x["context"] == r["context"]]
        base = {x["engine"]: x["tokens_per_s"] for x in same}
        hf = base.get("transformers dense")
        vs_hf = f"{r['tokens_per_s'] / hf:.2f}x" if hf else "-"
        table.append(f"| {r['context']} | {r['engine']} | {r['batch']} | {r['step_ms']:.0f} | "
                     f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['ours vanilla']:.2f}x | "
                     f"{vs_hf} | {r['kv_mib']:.0f} |")  # fmt: skip
    budget = rows[0]["budget_mib"]
    return [
        "## Decoding at equal KV memory (the headline)\n",
        "DMC with the trained model's own decisions: at equal batch, and at the largest batch "
        f"whose pages and window rings fit the vanilla batch's KV bytes ({budget:.0f} MiB at "
        f"{rows[0]['context']} tokens), beside our vanilla engine and transformers "
        "`LlamaForCausalLM` with its dense cache. One held-out prompt per context, its cache "
        "copied to every row; engines stepped in alternating order, process CPU time, "
        "1 thread (megatron_dmc/pipeline/decode.py).\n",
        "\n".join(table) + "\n",
        f"![decode at equal KV memory](decode/{HEADLINE_PLOT})\n",
    ]
