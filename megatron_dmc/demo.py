"""The main job: python -m megatron_dmc.demo [--preset default|tiny|full] [--recipe paper]

Imports the embedded SmolLM2-135M into Megatron-Core, retrofits DMC with the preset's
recipe (efficient: decision heads, delay, distillation; paper: zero_out -> retrofit ->
finetune), exports a DMC HF model, evaluates it against vanilla, H2O and TOVA,
measures decoding, and writes OUT/report.md with tables and plots. A re-run skips the
steps already done. See docs/demo.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from megatron_dmc.cli_errors import Parser, run
from megatron_dmc.pipeline import Job, load_preset
from megatron_dmc.pipeline.layout import default_out
from megatron_dmc.pipeline.preset import Preset
from megatron_dmc.pipeline.recipes import effective_values


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m megatron_dmc.demo", description=__doc__.split("\n\n")[1])
    parser.add_argument("--preset", default="default", help="default, tiny, full, or a YAML path")
    parser.add_argument("--recipe", help="training recipe instead of the preset's: efficient, "
                        "paper (configs/recipes/); the default output directory gets -<recipe>")  # fmt: skip
    parser.add_argument("--out", type=Path, help="output directory (default: outputs/<preset>)")
    parser.add_argument("--force", action="store_true", help="redo every step")
    parser.add_argument("--redo", action="append", default=[], metavar="STEP",
                        help="redo this step and the ones after it (repeatable)")  # fmt: skip
    parser.add_argument(
        "--cache-dir", help="asset cache (default: $MEGATRON_DMC_CACHE or ~/.cache)"
    )
    return parser


def _demo(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    preset = load_preset(args.preset)
    out = default_out(preset.name)
    if args.recipe and args.recipe != preset.train.recipe:
        preset = with_recipe(preset, args.recipe)
        out = out.with_name(f"{out.name}-{args.recipe}")
    out = args.out or out
    command = shlex.join(["python", "-m", "megatron_dmc.demo", *argv])
    report = Job(preset, out, args.cache_dir).run(args.force, tuple(args.redo), command)
    print(f"\nreport: {report}")
    return 0


def with_recipe(preset: Preset, recipe: str) -> Preset:
    """The preset with another recipe (checked again); a paper recipe keeps DMC rows only,
    since DMS needs decision heads, and its decisions exactly as trained (no calibration)."""
    from megatron_dmc.pipeline.recipes import recipe_path, uses_zero_out

    recipe_path(recipe)
    methods, calibrate = preset.train.methods, preset.train.calibrate_cr
    if uses_zero_out(effective_values(recipe, [])):
        methods = [m for m in methods if m == "dmc"] or ["dmc"]
        calibrate = False
    train = dataclasses.replace(
        preset.train, recipe=recipe, methods=methods, calibrate_cr=calibrate
    )
    return dataclasses.replace(preset, train=train)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 refused (one line on stderr), 1 stopped by NaN/inf."""
    return run(_demo, argv)


if __name__ == "__main__":
    sys.exit(main())
