"""Printed summary, JSON and PNG of a benchmark run."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def machine() -> dict:
    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__}  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def headline(results: dict) -> list[str]:
    """The issue's goals as measured ratios (side by side in this one run)."""
    lines = []
    for row in results["equal_memory"]:
        if row["mode"] != "vanilla":
            cr = row["compression_ratio"]
            lines.append(f"equal KV memory, {row['mode']}: throughput {row['throughput_vs_vanilla']:.2f}x "
                         f"vanilla = {row['throughput_vs_vanilla'] / cr:.2f} x CR (goal >= 0.9 x CR), "
                         f"batch {row['batch']} vs {row['batch'] / row['batch_vs_vanilla']:.0f}")  # fmt: skip
    for row in results["equal_batch"]:
        if row["mode"] != "vanilla" and row["context"] == max(
            r["context"] for r in results["equal_batch"]
        ):
            cr = row["compression_ratio"]
            lines.append(f"equal batch ctx {row['context']}, {row['mode']}: KV bytes "
                         f"{row['kv_bytes_vs_vanilla']:.3f}x vanilla = {row['kv_bytes_vs_vanilla'] * cr:.3f}/CR "
                         f"(goal <= 1.05/CR); peak {row['kv_peak_vs_vanilla']:.3f}x; "
                         f"decode {row['speedup_vs_vanilla']:.2f}x faster")  # fmt: skip
    for row in results["prefill"]:
        lines.append(f"prefill {row['tokens']} tokens, {row['mode']}: parallel is {row['speedup']:.1f}x "
                     "faster than token by token (goal >= 20x)")  # fmt: skip
    for row in results.get("hf_generate", []):
        lines.append(f"HF generate dense, ctx {row['context']}: {row['mode']} is {row['speedup_vs_hf']:.2f}x "
                     "its per-step speed")  # fmt: skip
    return lines


def write(results: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"bench_{results['preset']}.json"
    json_path.write_text(json.dumps(results, indent=2))
    png_path = out_dir / f"bench_{results['preset']}.png"
    _plot(results, png_path)
    return json_path, png_path


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    modes = sorted({r["mode"] for r in results["equal_batch"]}, key=_mode_order)
    for mode in modes:
        rows = [r for r in results["equal_batch"] if r["mode"] == mode]
        left.plot(
            [r["context"] for r in rows], [r["step_ms"] for r in rows], marker="o", label=mode
        )
    left.set(xscale="log", xlabel="context (tokens)", ylabel="ms per decode step",
             title=f"(a) equal batch {results['equal_batch'][0]['batch']}")  # fmt: skip
    left.legend()
    rows = results["equal_memory"]
    right.bar([f"{r['mode']}\nB={r['batch']}" for r in rows], [r["tokens_per_s"] for r in rows])
    right.set(ylabel="decode tokens/s", title="(b) equal KV memory budget")
    right.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{results['preset']}: {results['decisions']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mode_order(mode: str) -> float:
    if mode == "vanilla":
        return 0.0
    return float(mode.rsplit("cr", 1)[-1]) if "forced" in mode else float("inf")
