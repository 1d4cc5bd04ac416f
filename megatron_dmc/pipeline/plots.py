"""The report's figures (matplotlib, Agg backend): PNG files, one per question.

- loss.png: LM loss over training steps (raw and a running mean), stages marked.
- cr.png: target vs achieved compression ratio over steps, per target.
- cr_heatmap.png: CR per (layer, KV head): end of training, and on held-out decoding.
- decode.png: decode tokens/s and KV bytes, vanilla vs DMC.
- ppl_vs_cr.png: perplexity rise vs real CR per method, one panel per protocol.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import LogNorm

from megatron_dmc.pipeline.decode import DecodeResult

STAGE_COLOURS = {"zero_out": "#eeeeee", "retrofit": "#e3f0fb", "finetune": "#e9f7e4"}


def running_mean(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def _shade_stages(ax, records: list[dict]) -> None:
    start = 0
    for i, record in enumerate([*records, {"stage": None}]):
        if i and record["stage"] != records[start]["stage"]:
            stage = records[start]["stage"]
            ax.axvspan(records[start]["iteration"] - 0.5, records[i - 1]["iteration"] + 0.5,
                       color=STAGE_COLOURS.get(stage, "white"), zorder=0)  # fmt: skip
            start = i


def plot_loss(runs: dict[str, list[dict]], path: Path) -> Path:
    """`runs`: {label: records in iteration order} (zero_out records first in each)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    width = max(1, min(len(r) for r in runs.values()) // 10)
    for label, records in runs.items():
        steps = [r["iteration"] for r in records]
        losses = [r["lm_loss"] for r in records]
        (line,) = ax.plot(steps, losses, alpha=0.3, linewidth=1)
        ax.plot(steps, running_mean(losses, width), color=line.get_color(), label=label)
    _shade_stages(ax, next(iter(runs.values())))
    ax.set(xlabel="training step", ylabel="LM loss (nats/token)", title="LM loss")
    ax.legend(title=f"running mean of {width}; shading: zero_out / retrofit / finetune")
    return _save(fig, path)


def plot_cr(runs: dict[str, list[dict]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, records in runs.items():
        dmc = [r for r in records if r.get("achieved_cr") is not None]
        steps = [r["iteration"] for r in dmc]
        (line,) = ax.plot(steps, [r["achieved_cr"] for r in dmc], label=f"{label} achieved")
        ax.plot(steps, [r["target_cr"] for r in dmc], "--", color=line.get_color(),
                label=f"{label} target")  # fmt: skip
    ax.set(xlabel="training step", ylabel="compression ratio", title="Target vs achieved CR")
    ax.legend()
    return _save(fig, path)


def plot_heatmaps(maps: dict[str, list[list[float]]], path: Path) -> Path:
    """`maps`: {title: CR[layer][kv head]}, one panel each, one logarithmic colour scale
    (per-head CRs span 1 to hundreds)."""
    fig, axes = plt.subplots(1, len(maps), figsize=(3 + 2.5 * len(maps), 6), squeeze=False)
    top = max(max(max(row) for row in grid) for grid in maps.values())
    norm = LogNorm(vmin=1.0, vmax=max(top, 1.01))
    for ax, (title, grid) in zip(axes[0], maps.items()):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm)
        ax.set(xlabel="KV head", ylabel="layer", title=title)
        ax.set_xticks(range(len(grid[0])))
        ax.set_yticks(range(0, len(grid), max(1, len(grid) // 10)))
    fig.colorbar(image, ax=axes[0].tolist(), label="compression ratio")
    return _save(fig, path, tight=False)


def plot_decode(results: list[DecodeResult], path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [r.label for r in results]
    left.bar(labels, [r.tokens_per_s for r in results], color="#4c72b0")
    left.set(ylabel="tokens/s (process CPU time)", title="Decode throughput")
    right.bar(labels, [r.kv_allocated_bytes / 2**20 for r in results], color="#dd8452")
    right.set(ylabel="MiB", title="KV cache bytes")
    fig.suptitle(f"batch {results[0].batch}, {results[0].context}-token held-out prompts")
    return _save(fig, path)


PROTOCOL_PANELS = {
    "continuation": "continuation (dense prefill,\ncontinuation uncompressed)",
    "strided": "whole-sequence (fixed budget)",
    "matched_continuation": "matched continuation",
    "matched_strided": "matched whole-sequence",
}


def _rise_points(rows: list[dict], protocol: str) -> dict[str, list[tuple[float, float]]]:
    """{method: [(real CR, % perplexity change vs vanilla)]}, sorted by real CR."""
    key = f"ppl_{protocol}"
    base = next((r.get(key) for r in rows if r["method"] == "vanilla"), None)
    points: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        cr, value = row.get("real_cr", {}).get(protocol), row.get(key)
        if row["method"] != "vanilla" and None not in (base, cr, value):
            points.setdefault(row["method"], []).append((cr, 100.0 * (value / base - 1.0)))
    return {m: sorted(p) for m, p in points.items()}


def plot_ppl_vs_cr(rows: list[dict], path: Path) -> Path:
    """`rows`: the summary's evaluation rows. Symmetric-log y axis (rises span 0.1% to 1000s)."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True, squeeze=False)
    for ax, (protocol, title) in zip(axes.flat, PROTOCOL_PANELS.items()):
        for method, points in _rise_points(rows, protocol).items():
            ax.plot(*zip(*points), marker="o", label=method)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set(title=title, xlabel="real CR (tokens / KV slots)", ylabel="perplexity vs vanilla, %")
        if ax.has_data() and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle("Perplexity rise vs real compression ratio")
    return _save(fig, path)


def _save(fig, path: Path, tight: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
