"""`python -m megatron_dmc.eval {run,table,tasks-dir,gqa,calibrate}`: thin wrappers over the library."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from megatron_dmc.cli_errors import Parser, run
from megatron_dmc.eval import calibrate_cli, gqa
from megatron_dmc.eval.humaneval import HumanEvalSettings
from megatron_dmc.eval.matched import MATCHED_CHUNK
from megatron_dmc.eval.methods import METHODS, build_method, load_model, load_tokenizer
from megatron_dmc.eval.needle import NEEDLE_TASKS, NeedleSettings
from megatron_dmc.eval.results import load_results, write_results
from megatron_dmc.eval.run import GENERATION_TASKS, PROTOCOLS, EvalSettings, evaluate
from megatron_dmc.eval.task_files import ALL_TASKS, render_tasks
from megatron_dmc.finite import check_finite_weights


def _token_ids(args, tokenizer) -> torch.Tensor:
    if args.text is None:
        raise ValueError("--text FILE (held-out plain text) is needed for perplexity")
    text = Path(args.text).read_text()
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False))


def _split(text: str, kind: type = str) -> tuple:
    return tuple(kind(item) for item in text.split(",") if item)


def _settings(args) -> EvalSettings:
    protocols = (
        args.protocols
        if args.protocols is not None
        else ("" if args.text is None else ",".join(PROTOCOLS))
    )
    needle = NeedleSettings(
        tasks=_split(args.needle_tasks), lengths=_split(args.needle_lengths, int),
        depths=_split(args.needle_depths, float), samples=args.needle_samples,
        prefill_chunk=args.prefill_chunk or None,
    )  # fmt: skip
    humaneval = HumanEvalSettings(limit=args.limit or None, max_new_tokens=args.max_new_tokens)
    return EvalSettings(
        max_samples=args.max_samples,
        max_tokens=args.max_tokens,
        tasks=_split(args.tasks),
        limit=args.limit or None,
        mmlu_per_subject=args.mmlu_per_subject,
        humaneval=humaneval,
        needle=needle,
        protocols=_split(protocols),
        matched_chunk=args.matched_chunk,
    )


def _model_dir(args) -> str:
    if args.model:
        return args.model
    from megatron_dmc.assets import smollm2_hf_dir

    return str(smollm2_hf_dir())


def _run(args) -> None:
    settings = _settings(args)
    model_dir = _model_dir(args)
    model = load_model(model_dir)
    check_finite_weights(model.state_dict().items(), model_dir)
    tokenizer = load_tokenizer(model_dir)
    tokens = _token_ids(args, tokenizer) if settings.protocols else torch.zeros(0)
    row = evaluate(model, tokenizer, build_method(args.method, args.cr), tokens, settings)
    if args.out:
        Path(args.out).write_text(json.dumps(asdict(row), indent=2) + "\n")
    row.task_details = {}
    print(json.dumps(asdict(row), indent=2))


def _table(args) -> None:
    rows = [row for path in args.inputs for row in load_results(path)]
    print(write_results(rows, args.out).read_text())


def _add_task_args(run: argparse.ArgumentParser) -> None:
    tasks_help = ",".join((*ALL_TASKS, *GENERATION_TASKS))
    run.add_argument("--tasks", default="", help=f"comma list from {tasks_help}")
    run.add_argument(
        "--limit", type=int, default=100, help="docs per task, HumanEval problems; 0 = all"
    )
    run.add_argument(
        "--mmlu-per-subject", type=int, help="MMLU on the seeded subset of N per subject"
    )
    run.add_argument("--max-new-tokens", type=int, default=384, help="HumanEval completion tokens")
    run.add_argument("--needle-tasks", default=",".join(NEEDLE_TASKS))
    run.add_argument("--needle-lengths", default="1024,2048,4096,8192", help="context tokens")
    run.add_argument("--needle-depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    run.add_argument(
        "--needle-samples", type=int, default=1, help="samples per task, length, depth"
    )
    run.add_argument(
        "--prefill-chunk", type=int, default=512, help="needle prompt tokens per call; 0 = one call"
    )


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m megatron_dmc.eval")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="evaluate one model with one KV method -> JSON row")
    run.add_argument(
        "--model", help="HF model directory (Llama or DMC Llama); default: the embedded SmolLM2"
    )
    run.add_argument("--method", default="vanilla", choices=METHODS)
    run.add_argument("--cr", type=float, default=1.0, help="compression ratio (h2o/tova budget)")
    run.add_argument("--text", help="held-out plain text for perplexity")
    run.add_argument(
        "--protocols",
        help=f"perplexity protocols, comma list from {','.join(PROTOCOLS)} (default: all with --text)",
    )
    run.add_argument("--matched-chunk", type=int, default=MATCHED_CHUNK,
                     help="matched protocols: tokens per call (budget enforced after each)")  # fmt: skip
    run.add_argument("--max-samples", type=int, default=8, help="continuation samples")
    run.add_argument("--max-tokens", type=int, default=8192, help="whole-sequence tokens")
    _add_task_args(run)
    run.add_argument("--out", help="write the row here (JSON, with per-problem details)")
    table = sub.add_parser("table", help="JSON rows -> results.md + results.json")
    table.add_argument("inputs", nargs="+")
    table.add_argument("--out", required=True, help="output directory")
    tasks = sub.add_parser("tasks-dir", help="write the local task YAMLs, print the directory")
    tasks.add_argument("--out", help="directory (default: a new temporary one)")
    sub.add_parser("gqa", help="mean-pool K/V heads (see python -m megatron_dmc.eval.gqa -h)")
    sub.add_parser("calibrate", help="set a DMC/DMS export's decision threshold for a target CR")
    return parser


def _main(argv: list[str]) -> None:
    if argv[:1] == ["gqa"]:
        gqa.main(argv[1:])
        return
    if argv[:1] == ["calibrate"]:
        calibrate_cli.main(argv[1:])
        return
    args = _parser().parse_args(argv)
    if args.command == "run":
        _run(args)
    elif args.command == "table":
        _table(args)
    else:
        print(render_tasks(args.out))


def main(argv: list[str] | None = None) -> None:
    """A refusal prints one line and exits 2 (megatron_dmc.cli_errors)."""
    status = run(_main, sys.argv[1:] if argv is None else argv)
    if status:
        raise SystemExit(status)
