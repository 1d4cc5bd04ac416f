"""Command line of tools/convert_checkpoint.py (see docs/convert.md)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

from megatron_dmc.cli_errors import Parser
from megatron_dmc.convert import commands
from megatron_dmc.convert.hf_export import DEFAULT_MAX_SHARD_BYTES

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B?)\s*", text.upper())
    if not match or match.group(2) not in _UNITS:
        raise argparse.ArgumentTypeError(f"size {text!r}: use e.g. 5GB, 500MB, 2GiB or bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _parallel_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensor-model-parallel-size", "--tp", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", "--pp", type=int, default=1)


def _shard_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES, help="e.g. 5GB"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="convert_checkpoint.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import-hf", help="HF Llama directory -> Megatron torch_dist at TP/PP")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--save", required=True)
    _parallel_flags(p)

    p = sub.add_parser("export-hf", help="Megatron checkpoint -> HF directory")
    p.add_argument("--load", required=True)
    p.add_argument("--hf-dir", required=True)
    p.add_argument(
        "--dmc",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force (or, with --no-dmc, suppress) the DMC export; default: metadata",
    )
    p.add_argument("--tokenizer-dir", help="copy tokenizer files from here instead")
    p.add_argument("--hf-config", help="config.json for checkpoints without megatron_dmc metadata")
    _shard_flag(p)

    p = sub.add_parser("roundtrip", help="HF -> Megatron -> HF, verify bitwise")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--work-dir", help="where the temporary checkpoints go")
    _parallel_flags(p)
    _shard_flag(p)

    p = sub.add_parser("reshard", help="Megatron checkpoint -> same model saved at TP/PP")
    p.add_argument("--load", required=True)
    p.add_argument("--save", required=True)
    _parallel_flags(p)

    p = sub.add_parser("import-release", help="Megatron-LM torch-format (NVIDIA DMC release)")
    p.add_argument("--load", required=True)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--save", help="write our Megatron torch_dist checkpoint")
    target.add_argument("--hf-dir", help="write the (DMC) HF directory directly")
    p.add_argument("--vocab-size", type=int, help="real vocabulary (drops padded rows)")
    p.add_argument("--tokenizer-dir", help="HF directory to copy tokenizer files from")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling")
    _parallel_flags(p)
    _shard_flag(p)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Raises on a refusal; tools/convert_checkpoint.py turns that into one line, exit 2."""
    args = build_parser().parse_args(argv)
    tp_pp = (
        getattr(args, "tensor_model_parallel_size", 1),
        getattr(args, "pipeline_model_parallel_size", 1),
    )
    if args.command == "import-hf":
        print(commands.import_hf(args.hf_dir, args.save, *tp_pp))
    elif args.command == "export-hf":
        print(
            commands.export_hf(
                args.load,
                args.hf_dir,
                args.dmc,
                args.max_shard_size,
                args.tokenizer_dir,
                args.hf_config,
            )
        )
    elif args.command == "roundtrip":
        names = commands.roundtrip(args.hf_dir, *tp_pp, args.work_dir, args.max_shard_size)
        print(f"roundtrip at TP={tp_pp[0]} PP={tp_pp[1]}: {len(names)} tensors bitwise equal")
    elif args.command == "reshard":
        print(commands.reshard(args.load, args.save, *tp_pp))
    elif args.save:
        print(
            commands.import_release(
                args.load,
                args.save,
                *tp_pp,
                args.vocab_size,
                args.trust_checkpoint,
                args.tokenizer_dir,
            )
        )
    else:
        print(
            commands.export_release_hf(
                args.load,
                args.hf_dir,
                args.vocab_size,
                args.trust_checkpoint,
                args.tokenizer_dir,
                args.max_shard_size,
            )
        )
