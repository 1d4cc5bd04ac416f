"""The report step: read what the other steps wrote, plot, summarise, render report.md."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from megatron_dmc.eval.calibrate import CALIBRATION_FILE
from megatron_dmc.eval.results import ResultRow, load_results
from megatron_dmc.pipeline import plots, report, report_tasks, targets
from megatron_dmc.pipeline.decode import DecodeResult
from megatron_dmc.pipeline.decode import load_results as load_decode
from megatron_dmc.pipeline.layout import RunLayout, row_key
from megatron_dmc.pipeline.preset import Preset
from megatron_dmc.pipeline.retrofit import first_iteration, read_metrics
from megatron_dmc.pipeline.steps import read_timings
from megatron_dmc.pipeline.summary import build_summary, gqa_training_summary, training_summary


def training_runs(preset: Preset, layout: RunLayout) -> dict[str, list[dict]]:
    """{row label: its records}: zero_out's (when that row started from it), then the row's."""
    runs = {}
    for label, method, cr in preset.rows():
        first = read_metrics(layout.zero_out_dir) if first_iteration(preset, method) else []
        runs[label] = first + read_metrics(layout.train_dir(method, cr))
    return runs


def row_training(preset: Preset, layout: RunLayout, runs: dict[str, list[dict]]) -> list[dict]:
    """training_summary of every row, with its label, KV method, recipe and wall time (its
    retrofit step, plus zero_out for a row that started from it)."""
    seq = preset.train.seq_length * preset.train.global_batch_size
    timings = read_timings(layout.done_dir)
    out = []
    for label, method, cr in preset.rows():
        cr_map = trained_layer_head_cr(layout.export_dir(method, cr))
        t = training_summary(runs[label], cr, seq, cr_map)
        steps = [f"retrofit_{row_key(method, cr)}"]
        steps += ["zero_out"] if first_iteration(preset, method) else []
        wall = [timings[s]["wall_s"] for s in steps if s in timings]
        t |= {"label": label, "method": method, "recipe": preset.train.recipe,
              "wall_s": sum(wall) if len(wall) == len(steps) else None,
              "calibration": read_calibration(layout.export_dir(method, cr))}  # fmt: skip
        out.append(t)
    return out


def trained_layer_head_cr(export_dir: Path) -> list[list[float]] | None:
    """CR per (layer, KV head) at the last training step, from the export's config.json
    (metrics.jsonl does not carry it)."""
    config = json.loads((export_dir / "config.json").read_text())
    return config.get("dmc_layer_head_cr")


def read_calibration(export_dir: Path) -> dict | None:
    """The decision-threshold search of an export (eval/calibrate.py), None if not run."""
    path = export_dir / CALIBRATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def gqa_training(preset: Preset, layout: RunLayout, rows: list[ResultRow]) -> dict | None:
    """The uptraining's summary (None when the preset does not uptrain GQA)."""
    gqa_cr = next((r.compression_ratio for r in rows if r.method == "gqa-uptrained"), None)
    if not preset.eval.gqa_uptrain or gqa_cr is None:
        return None
    seq = preset.train.seq_length * preset.train.global_batch_size
    records = read_metrics(layout.gqa_train_dir)
    return gqa_training_summary(records, gqa_cr, preset.gqa_budget_cr(gqa_cr), seq)


def make_plots(
    runs: dict[str, list[dict]], summary: dict, decode: list[DecodeResult], out: Path
) -> dict[str, Path]:
    maps = {}
    for t in summary["training"]:
        if t["layer_head_cr"]:
            maps[f"{t['label']}: last training step"] = t["layer_head_cr"]
    for d in summary["decode"][1:]:
        maps[f"{d['label']}: held-out decode"] = d["cr_per_head_LG"]
    return {
        "LM loss": plots.plot_loss(runs, out / "loss.png"),
        "Target vs achieved CR": plots.plot_cr(runs, out / "cr.png"),
        "CR per layer and KV head": plots.plot_heatmaps(maps, out / "cr_heatmap.png"),
        "Decode throughput and KV bytes": plots.plot_decode(decode, out / "decode.png"),
        "Perplexity rise vs real CR, per protocol": plots.plot_ppl_vs_cr(
            summary["results"], out / "ppl_vs_cr.png"
        ),
    }


def write_report(preset: Preset, layout: RunLayout, command: str) -> Path:
    runs = training_runs(preset, layout)
    training = row_training(preset, layout, runs)
    decode = load_decode(layout.decode_file)
    rows = load_results(layout.eval_dir / "results.json")
    summary = build_summary(
        dataclasses.asdict(preset) | {"name": preset.name},
        command,
        read_timings(layout.done_dir),
        training,
        rows,
        decode,
        gqa_training(preset, layout, rows),
    )
    figures = make_plots(runs, summary, decode, layout.plots_dir)
    layout.summary.write_text(json.dumps(summary, indent=2) + "\n")
    layout.report.write_text(report.render(summary, figures, layout.root))
    report_tasks.extend_report(layout)
    targets.extend_report(layout, summary)
    print(f"   wrote {layout.report}")
    return layout.report
