"""`python -m megatron_dmc.eval {run,table,tasks-dir,gqa}`: thin wrappers over the library."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from megatron_dmc.cli_errors import Parser
from megatron_dmc.eval import gqa
from megatron_dmc.eval.methods import METHODS, build_method, load_model, load_tokenizer
from megatron_dmc.eval.results import load_results, write_results
from megatron_dmc.eval.run import EvalSettings, evaluate
from megatron_dmc.eval.task_files import ALL_TASKS, render_tasks
from megatron_dmc.finite import check_finite_weights


def _token_ids(args, tokenizer) -> torch.Tensor:
    if args.text is None:
        raise ValueError("--text FILE (held-out plain text) is needed for perplexity")
    text = Path(args.text).read_text()
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False))


def _run(args) -> None:
    model = load_model(args.model)
    check_finite_weights(model.state_dict().items(), args.model)
    tokenizer = load_tokenizer(args.model)
    settings = EvalSettings(
        max_samples=args.max_samples,
        max_tokens=args.max_tokens,
        tasks=tuple(t for t in args.tasks.split(",") if t),
        limit=args.limit or None,
        protocols=tuple(p for p in args.protocols.split(",") if p),
    )
    tokens = _token_ids(args, tokenizer) if settings.protocols else torch.zeros(0)
    row = evaluate(model, tokenizer, build_method(args.method, args.cr), tokens, settings)
    text = json.dumps(asdict(row), indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


def _table(args) -> None:
    rows = [row for path in args.inputs for row in load_results(path)]
    print(write_results(rows, args.out).read_text())


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m megatron_dmc.eval")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="evaluate one model with one KV method -> JSON row")
    run.add_argument("--model", required=True, help="HF model directory (Llama or DMC Llama)")
    run.add_argument("--method", default="vanilla", choices=METHODS)
    run.add_argument("--cr", type=float, default=1.0, help="compression ratio (h2o/tova budget)")
    run.add_argument("--text", help="held-out plain text for perplexity")
    run.add_argument("--protocols", default="strided,continuation")
    run.add_argument("--max-samples", type=int, default=8, help="continuation samples")
    run.add_argument("--max-tokens", type=int, default=8192, help="whole-sequence tokens")
    run.add_argument("--tasks", default="", help=f"comma list from {','.join(ALL_TASKS)}")
    run.add_argument("--limit", type=int, default=100, help="docs per task; 0 = all")
    run.add_argument("--out", help="write the row here (JSON)")
    table = sub.add_parser("table", help="JSON rows -> results.md + results.json")
    table.add_argument("inputs", nargs="+")
    table.add_argument("--out", required=True, help="output directory")
    tasks = sub.add_parser("tasks-dir", help="write the local task YAMLs, print the directory")
    tasks.add_argument("--out", help="directory (default: a new temporary one)")
    sub.add_parser("gqa", help="mean-pool K/V heads (see python -m megatron_dmc.eval.gqa -h)")
    return parser


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gqa"]:
        gqa.main(argv[1:])
        return
    args = _parser().parse_args(argv)
    if args.command == "run":
        _run(args)
    elif args.command == "table":
        _table(args)
    else:
        print(render_tasks(args.out))
