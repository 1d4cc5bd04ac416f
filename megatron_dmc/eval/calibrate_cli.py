"""`python -m megatron_dmc.eval calibrate`: set a DMC/DMS export's decision threshold so
that its real CR at the given length equals the target (eval/calibrate.py)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from megatron_dmc.cli_errors import Parser
from megatron_dmc.data.gpt_dataset import indexed_tokens
from megatron_dmc.eval.calibrate import (
    CalibrationSettings,
    calibrate_threshold,
    write_calibration,
)
from megatron_dmc.eval.methods import load_model, load_tokenizer
from megatron_dmc.finite import check_finite_weights


def _parser() -> Parser:
    parser = Parser(prog="python -m megatron_dmc.eval calibrate", description=__doc__)
    parser.add_argument("--model", required=True,
                        help="DMC or DMS HF export; its config.json gets dmc_decision_threshold")  # fmt: skip
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--data-path", help="indexed dataset prefix, e.g. the training corpus")
    text.add_argument("--text", help="plain text file")
    parser.add_argument("--target-cr", type=float, help="default: the export's dmc_target_cr")
    parser.add_argument("--context-len", type=int, default=1024)
    parser.add_argument("--continuation-len", type=int, default=128)
    parser.add_argument("--samples", type=int, default=2, help="blocks measured per probe")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="accept a real CR in [target, target * (1 + tolerance)]")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="search and print; write nothing")
    return parser


def _settings(args, config: dict) -> CalibrationSettings:
    if config.get("model_type") != "llama_dmc":
        raise ValueError(
            f"{args.model}/config.json is not a DMC export (model_type "
            f"{config.get('model_type')!r}); calibrate a model exported with export-hf --dmc"
        )
    target = args.target_cr or config.get("dmc_target_cr")
    if target is None:
        raise ValueError("the export has no dmc_target_cr: give --target-cr")
    return CalibrationSettings(
        float(target), args.context_len, args.continuation_len, args.samples, args.tolerance
    )


def _tokens(args) -> torch.Tensor:
    if args.data_path:
        return indexed_tokens(args.data_path)
    text = Path(args.text).read_text()
    ids = load_tokenizer(args.model).encode(text, add_special_tokens=False)
    return torch.tensor(ids)


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    config_path = Path(args.model) / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{args.model} is not an HF model directory (no config.json)")
    settings = _settings(args, json.loads(config_path.read_text()))
    tokens = _tokens(args)
    needed = settings.samples * (settings.context_len + settings.continuation_len)
    if len(tokens) < needed:
        raise ValueError(
            f"the calibration text has {len(tokens)} tokens; {settings.samples} samples of "
            f"{settings.context_len}+{settings.continuation_len} need {needed}: give more "
            "text or fewer --samples"
        )
    model = load_model(args.model)
    check_finite_weights(model.state_dict().items(), args.model)
    calibration = calibrate_threshold(model, tokens, settings)
    if not args.dry_run:
        write_calibration(args.model, calibration)
    print(json.dumps(asdict(calibration), indent=2))
