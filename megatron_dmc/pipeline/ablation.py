"""The retrofit ablation: python -m megatron_dmc.pipeline.ablation --preset default
--targets 2,4 --variants paper,heads,heads+distill,heads+distill+frozen+delay64

Every variant is the paper recipe plus a delta; the names compose with `+`:
`paper` (nothing added), `heads` (decision heads, no zero_out), `distill` (KL to the model
with compression off as the only task loss), `frozen` (only the decision heads train),
`lora` (heads, the base frozen with rank-8 LoRA adapters on q/k/v/o), `delayN` (the most
recent N tokens exact), `lr10` (the decision rows' update 10x the base LR instead of the paper
recipe's 1000x: the efficient recipe's multiplier), `calibrated` (after export the decision
threshold is calibrated so that the real CR at the evaluation length is the target, as in
the main job; eval/calibrate.py). `heads+distill+frozen+delay64+lr10+calibrated` is the
efficient recipe of the main job. Each variant runs the main job's steps (import, zero_out where the
variant has channel decisions, retrofit + finetune per target, export, evaluation without
baselines or tasks) on the preset's data, steps per target and held-out protocols, in
OUT/<variant>/; the preset's `train.extra_args` are not applied. Writes OUT/ablation.md and
OUT/ablation.json: per variant and target, training tokens, wall time, the perplexity of
each protocol and its rise against vanilla. OUT defaults to the main job's `ablation/`
directory, whose report then includes the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import sys
from pathlib import Path

from megatron_dmc.cli_errors import Parser, run
from megatron_dmc.pipeline.goals import ppl_change
from megatron_dmc.pipeline.layout import RunLayout, cr_tag, default_out
from megatron_dmc.pipeline.preset import Preset, load_preset

DELTAS = {
    "paper": [],
    "heads": ["--dmc-decision-source", "heads"],
    "distill": ["--dmc-distill-weight", "1", "--dmc-lm-loss-weight", "0"],
    "frozen": ["--dmc-trainable", "dmc-heads"],
    "lora": ["--dmc-decision-source", "heads", "--dmc-trainable", "lora", "--dmc-lora-rank", "8"],
    "lr10": ["--dmc-decision-lr-mult", "10"],
}
"""Flags each name adds to the paper recipe (`delayN` adds --dmc-merge-delay N)."""
CALIBRATED = "calibrated"
"""The part that adds a step, not a flag: the main job's threshold calibration."""
DEFAULT_VARIANTS = ("paper,heads,heads+distill,heads+distill+frozen,heads+distill+frozen+delay16,"
                    "heads+distill+frozen+delay64,lora+distill+delay64,"
                    "heads+distill+frozen+delay64+lr10+calibrated")  # fmt: skip
SHORT = {
    "ppl_matched_continuation": "matched continuation",
    "ppl_matched_strided": "matched whole-sequence",
    "ppl_continuation": "continuation",
    "ppl_strided": "whole-sequence",
}
"""Column names of the protocols (goals.PROTOCOLS names them in full)."""
STEPS = re.compile(r"assets|import|zero_out|retrofit_.*|export_.*|calibrate_.*|eval")
"""The main job's steps an ablation variant runs."""


def variant_flags(name: str) -> list[str]:
    """The training flags a variant adds to the paper recipe."""
    flags: list[str] = []
    for part in name.split("+"):
        delay = re.fullmatch(r"delay(\d+)", part)
        if delay:
            flags += ["--dmc-merge-delay", delay.group(1)]
        elif part == CALIBRATED:
            continue
        elif part in DELTAS:
            flags += DELTAS[part]
        else:
            raise ValueError(
                f"variant {name!r}: unknown part {part!r}; compose {sorted(DELTAS)}, "
                f"{CALIBRATED} and delayN with +"
            )
    return flags


def variant_preset(base: Preset, name: str, targets: list[float]) -> Preset:
    """The preset of one variant: paper recipe + delta, DMC only, evaluation without
    baselines, GQA or tasks. Refuses (ValueError) what the variant cannot train."""
    from megatron_dmc.pipeline.eval_tasks import PaperTasks

    train = dataclasses.replace(base.train, recipe="paper", methods=["dmc"],
                                extra_args=variant_flags(name),
                                calibrate_cr=CALIBRATED in name.split("+"))  # fmt: skip
    evaluation = dataclasses.replace(base.eval, tasks=[], baselines=[], gqa_kv_heads=None,
                                     gqa_uptrain=False)  # fmt: skip
    try:
        preset = dataclasses.replace(base, target_crs=targets, train=train, eval=evaluation,
                                     paper_tasks=PaperTasks(), rise_targets={})  # fmt: skip
        check_training_flags(preset)
    except ValueError as error:
        raise ValueError(f"variant {name!r}: {error}") from error
    return preset


def check_training_flags(preset: Preset) -> None:
    """Parse every launch of the preset's rows with the trainer's own checks (no files)."""
    from megatron_dmc.pipeline.assets import Assets
    from megatron_dmc.pipeline.retrofit import retrofit_args
    from megatron_dmc.training.arguments import parse_args

    assets, here = Assets("hf", "tokenizer", "train", "held_out"), Path("unused")
    for _, method, cr in preset.rows():
        parse_args(retrofit_args(preset, assets, here, here, here, cr, method))


def variant_rows(preset: Preset, layout: RunLayout, variant: str) -> list[dict]:
    """One row per target of a finished variant: tokens, wall time, perplexities, rises."""
    from megatron_dmc.eval.results import load_results
    from megatron_dmc.pipeline.write_report import row_training, training_runs

    results = [dataclasses.asdict(r) for r in load_results(layout.eval_dir / "results.json")]
    summary = {"results": results}
    rows = []
    for t in row_training(preset, layout, training_runs(preset, layout)):
        cr = t["target_cr"]
        dmc = next(r for r in results if r["method"] == "dmc" and r["compression_ratio"] == cr)
        ppl = {key: dmc.get(key) for key in SHORT if dmc.get(key) is not None}
        rise = {key: ppl_change(summary, "dmc", cr, key) for key in ppl}
        rows.append({"variant": variant, "target_cr": cr, "steps": t["steps"],
                     "tokens": t["tokens"], "wall_s": t["wall_s"],
                     "final_achieved_cr": t["final_achieved_cr"],
                     "held_out_cr": (dmc.get("real_cr") or {}).get("continuation"),
                     "threshold": (t.get("calibration") or {}).get("threshold"),
                     "ppl": ppl, "rise": rise, "flags": preset.train.extra_args})  # fmt: skip
    return rows


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def ablation_markdown(data: dict) -> str:
    """The ablation table: a row per variant and target."""
    from megatron_dmc.pipeline.report import table

    keys = [(k, n) for k, n in SHORT.items() if any(k in r["ppl"] for r in data["rows"])]
    header = ["variant", "target", "tokens", "wall s", "achieved CR", "held-out CR", "threshold"]
    header += [f"{name} ppl (rise)" for _, name in keys]
    rows = []
    for r in data["rows"]:
        cells = [r["variant"], cr_tag(r["target_cr"]), str(r["tokens"]),
                 "–" if r["wall_s"] is None else f"{r['wall_s']:.0f}",
                 _number(r["final_achieved_cr"]), _number(r.get("held_out_cr")),
                 _number(r.get("threshold"))]  # fmt: skip
        for key, _ in keys:
            ppl, rise = r["ppl"].get(key), r["rise"].get(key)
            cells.append("–" if ppl is None else f"{ppl:.2f} ({rise:+.1f}%)")
        rows.append(cells)
    note = (f"Preset `{data['preset']}`; every variant is the paper recipe plus its flags "
            f"(megatron_dmc/pipeline/ablation.py), the same data, steps per target and held-out "
            f"protocols. `{data['command']}`\n")  # fmt: skip
    return note + "\n" + table(header, rows)


def run_ablation(base: Preset, variants: list[str], targets: list[float], out: Path,
                 cache_dir: str | None = None, command: str = "") -> Path:  # fmt: skip
    """Run every variant (each resumable in OUT/<variant>), then write the table."""
    from megatron_dmc.pipeline.job import Job

    presets = {name: variant_preset(base, name, targets) for name in variants}
    rows = []
    for name, preset in presets.items():
        print(f"\n==== variant {name}: paper recipe {' '.join(preset.train.extra_args)}")
        job = Job(preset, out / name, cache_dir)
        job.run(command=command, keep=lambda step: STEPS.fullmatch(step) is not None)
        rows += variant_rows(preset, job.layout, name)
    data = {"preset": base.name, "command": command, "targets": targets, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "ablation.md").write_text("# Retrofit ablation\n\n" + ablation_markdown(data))
    return out / "ablation.md"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m megatron_dmc.pipeline.ablation",
                    description="Recipe ablation on one preset's data and protocol.")  # fmt: skip
    parser.add_argument("--preset", default="default", help="default, tiny, full, or a YAML path")
    parser.add_argument("--targets", default="2,4", help="target CRs, comma-separated")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated names")
    parser.add_argument("--out", type=Path, help="default: the main job's OUT/ablation")
    parser.add_argument("--cache-dir", help="asset cache (default: $MEGATRON_DMC_CACHE)")
    return parser


def _ablation(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    base = load_preset(args.preset)
    try:
        targets = [float(x) for x in args.targets.split(",")]
    except ValueError as error:
        raise ValueError(f"--targets takes ratios like 2,4; got {args.targets!r}") from error
    variants = [v for v in args.variants.split(",") if v]
    out = args.out or RunLayout(default_out(base.name)).ablation_dir
    command = shlex.join(["python", "-m", "megatron_dmc.pipeline.ablation", *argv])
    print(f"\nablation: {run_ablation(base, variants, targets, out, args.cache_dir, command)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 refused (one line on stderr), 1 stopped by NaN/inf."""
    return run(_ablation, argv)


if __name__ == "__main__":
    sys.exit(main())
