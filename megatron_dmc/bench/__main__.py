"""python -m megatron_dmc.bench [--quick | --preset cpu|gpu|smollm2] [--out DIR]

A benchmark, not a test: (a) equal-batch decode latency, (b) equal-KV-memory throughput,
(c) parallel vs token-by-token prefill, (d) HF transformers generate (dense cache).
Random weights; DMC decisions are FORCED to each CR (labelled in every output).

--preset smollm2: SmolLM2-135M's real weights at --contexts (default 1024 2048 4096),
batch --batch: transformers dense vs ours vanilla vs DMC (FORCED --cr, or --model-dir's
own decisions), DMC with a merge delay and DMS (both FORCED, --delay W exact tokens per
stream, counted in KV bytes) at equal batch and equal KV memory, interleaved in one run
(megatron_dmc/bench/smollm2.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from megatron_dmc.bench import report, sections
from megatron_dmc.bench.presets import PRESETS
from megatron_dmc.bench.timing import clock_name
from megatron_dmc.bench.workloads import MODEL_DECISIONS, random_model
from megatron_dmc.cli_errors import Parser, run
from megatron_dmc.finite import check_finite_weights
from megatron_dmc.inference.loading import load_model


def main(argv: list[str] | None = None) -> dict:
    p = Parser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CPU preset that takes a few minutes")
    p.add_argument("--preset", choices=[*sorted(PRESETS), "smollm2"], default="cpu")
    p.add_argument("--out", type=Path, default=Path("bench_results"))
    p.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "c", "d"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    p.add_argument("--model-dir", help="a DMC HF export: use its weights and its own decisions")
    p.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=[1024, 2048, 4096],
        help="smollm2: decode contexts",
    )
    p.add_argument(
        "--transformers-contexts",
        type=int,
        nargs="*",
        help="smollm2: contexts with the transformers row (default: all)",
    )
    p.add_argument(
        "--equal-memory-contexts",
        type=int,
        nargs="*",
        help="smollm2: contexts with the equal-KV-memory rows (default: all)",
    )
    p.add_argument("--batch", type=int, default=16, help="smollm2: equal batch")
    p.add_argument("--steps", type=int, default=3, help="smollm2: timed steps per engine")
    p.add_argument("--cr", type=float, nargs="*", default=[4.0], help="smollm2: FORCED CRs")
    p.add_argument("--backend", default="paged", help="smollm2: our decode attention")
    p.add_argument(
        "--delay",
        type=int,
        default=256,
        help="smollm2: also rows for DMC with this merge delay and DMS with this window, "
        "FORCED at each --cr (0: none)",
    )
    args = p.parse_args(argv)
    if args.preset == "smollm2":
        return _smollm2(p, args)
    preset = PRESETS["quick" if args.quick else args.preset]
    torch.set_num_threads(args.threads)
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("the gpu preset needs CUDA; use --quick or --preset cpu on this machine")
    start = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {line}", flush=True)

    model, preset, note = _model(args, preset)
    results = {"preset": preset.name, "machine": report.machine(), "decisions": note,
               "shape": preset.shape.to_dict(), "page_size": preset.page_size,
               "prefill_chunk": preset.prefill_chunk, "clock": clock_name(preset.device)}  # fmt: skip
    log(f"{preset.name} on {results['machine']}; {note}; timing: {results['clock']}")
    for key, name, fn in (("a", "equal_batch", sections.equal_batch), ("b", "equal_memory", sections.equal_memory),
                          ("c", "prefill", sections.prefill), ("d", "hf_generate", sections.hf_generate)):  # fmt: skip
        results[name] = [] if key in args.skip else fn(model, preset, log)
    results["headline"] = report.headline(results)
    print("\n".join(["", f"== headline ratios ({note})", *results["headline"]]))
    json_path, png_path = report.write(results, args.out)
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - start:.0f}s")
    return results


def _smollm2(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    from megatron_dmc.bench.smollm2 import run

    if args.batch < 1 or args.steps < 1 or min(args.contexts) < 1 or any(c < 1 for c in args.cr):
        parser.error("--batch, --steps and --contexts must be >= 1 and every --cr >= 1")
    if args.delay < 0:
        parser.error("--delay must be >= 0 (0: no delayed DMC / DMS rows)")
    torch.set_num_threads(1)
    return run(args)


def _model(args: argparse.Namespace, preset):
    """Random weights with forced CRs, or a DMC export with its own decisions."""
    if args.model_dir is None:
        return random_model(preset), preset, sections.MODES_NOTE
    model = load_model(args.model_dir, mode="dmc", device=preset.device)
    check_finite_weights(model.state_dict().items(), args.model_dir)
    model.trained_dmc, model.dmc = model.dmc, None
    dtype = model.lm_head.weight.dtype
    preset = dataclasses.replace(
        preset,
        name=f"{preset.name}-model",
        shape=model.shape,
        dtype=dtype,
        crs=(MODEL_DECISIONS,),
        prefill_modes=(),
    )
    return model, preset, sections.MODEL_NOTE


if __name__ == "__main__":
    sys.exit(run(main))
