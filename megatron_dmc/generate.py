"""Generate text with the compressed (DMC) or vanilla paged KV cache and print the achieved CR.

python -m megatron_dmc.generate --model-dir EXPORT --prompt "The capital of France is"
python -m megatron_dmc.generate --megatron-checkpoint CKPT --tokenizer-dir HF --prompt ...
python -m megatron_dmc.generate --model-dir EXPORT --token-ids 1,450,7483 --forced-cr 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from megatron_dmc.cli_errors import Parser, run
from megatron_dmc.finite import check_finite_weights
from megatron_dmc.inference.decisions import forced_rate_label
from megatron_dmc.inference.generation import generate
from megatron_dmc.inference.loading import MODES, load_model
from megatron_dmc.inference.model import LlamaForInference
from megatron_dmc.inference.sampling import SamplingConfig
from megatron_dmc.schema.llama import DTYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="HF directory: a DMC export or a plain Llama")
    src.add_argument("--megatron-checkpoint", help="Megatron checkpoint dir (exported on the fly)")
    p.add_argument("--prompt", action="append", default=[], help="repeat for a batch")
    p.add_argument("--token-ids", action="append", default=[], help="comma-separated ids")
    p.add_argument("--tokenizer-model", help="sentencepiece .model (default: from the model dir)")
    p.add_argument("--tokenizer-dir", help="HF tokenizer dir (default: the model dir)")
    p.add_argument("--mode", choices=MODES, default="auto")
    p.add_argument(
        "--forced-cr", type=float, help="BENCHMARK ONLY: force this CR, ignore the model"
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, help="KV budget in pages (default: never runs out)")
    p.add_argument("--chunk-size", type=int, help="prefill chunk length (default: whole prompt)")
    p.add_argument(
        "--backend",
        default="paged",
        help="decode attention: paged (default), blocked, padded, reference, triton, flash",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's dtype")
    return p.parse_args(argv)


def _tokenizer(args: argparse.Namespace):
    from megatron_dmc.data.tokenizer import build_tokenizer

    if args.tokenizer_model or args.tokenizer_dir:
        return build_tokenizer(args.tokenizer_model, args.tokenizer_dir)
    source = Path(args.model_dir or args.megatron_checkpoint)
    if (source / "tokenizer.model").is_file():
        return build_tokenizer(tokenizer_model=source / "tokenizer.model")
    if (source / "tokenizer.json").is_file():
        return build_tokenizer(tokenizer_dir=source)
    return None


def _eos_ids(args: argparse.Namespace, tokenizer) -> tuple[int, ...]:
    if tokenizer is not None:
        return (tokenizer.eod_id,)
    config_file = Path(args.model_dir or "") / "config.json"
    eos = json.loads(config_file.read_text()).get("eos_token_id") if config_file.is_file() else None
    return tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _check(args: argparse.Namespace) -> None:
    """Refuse bad sizes before loading anything."""
    for flag in ("max_new_tokens", "page_size", "num_pages", "chunk_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(
                f"--{flag.replace('_', '-')} must be >= 1; got {value}"
                + (" (omit it for a budget that never runs out)" if flag == "num_pages" else "")
            )


def load_megatron_checkpoint(
    load_dir: str | Path,
    mode: str = "auto",
    forced_cr: float | None = None,
    dtype: torch.dtype | None = None,
) -> LlamaForInference:
    """A Megatron checkpoint (any TP/PP), exported to HF format in a temporary directory."""
    from megatron_dmc.convert.commands import export_hf  # Megatron, only for this source

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_hf(load_dir, Path(tmp) / "hf")
        return load_model(hf_dir, mode, forced_cr, dtype)


def main(argv: list[str] | None = None) -> None:
    """Raises on a refusal; `python -m` turns that into one line, exit 2."""
    args = parse_args(argv)
    _check(args)
    dtype = DTYPES[args.dtype] if args.dtype else None
    source = args.model_dir or args.megatron_checkpoint
    loader = load_model if args.model_dir else load_megatron_checkpoint
    model = loader(source, args.mode, args.forced_cr, dtype)
    check_finite_weights(model.state_dict().items(), source)
    tokenizer = _tokenizer(args)
    prompts = [[int(t) for t in ids.split(",")] for ids in args.token_ids]
    if args.prompt:
        if tokenizer is None:
            raise ValueError("--prompt needs a tokenizer: pass --tokenizer-model/--tokenizer-dir")
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        prompts += [bos + tokenizer.encode(text) for text in args.prompt]
    sampling = SamplingConfig(
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        _eos_ids(args, tokenizer),
        args.seed,
    )
    with torch.inference_mode():
        result = generate(
            model, prompts, sampling, args.page_size, args.num_pages, args.chunk_size, args.backend
        )
    for b, new in enumerate(result.tokens):
        text = tokenizer.decode(new) if tokenizer is not None else ",".join(map(str, new))
        print(f"[{b}] ({result.finish_reasons[b]}) {text}")
    print(_summary(model, result))


def _summary(model, result) -> str:
    mode = "vanilla (no compression)" if model.dmc is None else forced_rate_label(model.forced)
    stats = result.stats_after_prefill
    return (
        f"mode: {mode}\n"
        f"achieved compression ratio: {result.compression_ratio:.3f} "
        f"(tokens seen / KV slots kept, all layers, heads and sequences)\n"
        f"per sequence: {', '.join(f'{cr:.2f}' for cr in result.per_sequence_cr)}\n"
        f"after prefill: CR {stats.compression_ratio:.3f}, KV pages {stats.allocated_bytes / 2**20:.2f} MiB "
        f"vs dense {stats.dense_bytes / 2**20:.2f} MiB, fragmentation {stats.fragmentation:.1%}\n"
        f"peak KV pages {result.peak_cache_bytes / 2**20:.2f} MiB + prefill working set "
        f"{result.prefill_transient_bytes / 2**20:.2f} MiB"
    )


if __name__ == "__main__":
    sys.exit(run(main))
