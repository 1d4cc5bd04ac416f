"""python -m megatron_dmc.bench [--quick | --preset cpu|gpu] [--out DIR]

A benchmark, not a test: (a) equal-batch decode latency, (b) equal-KV-memory throughput,
(c) parallel vs token-by-token prefill, (d) HF transformers generate (dense cache).
Random weights; DMC decisions are FORCED to each CR (labelled in every output).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from megatron_dmc.bench import report, sections
from megatron_dmc.bench.presets import PRESETS
from megatron_dmc.bench.timing import clock_name
from megatron_dmc.bench.workloads import random_model


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CPU preset that takes a few minutes")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--out", type=Path, default=Path("bench_results"))
    p.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "c", "d"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else args.preset]
    torch.set_num_threads(args.threads)
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("the gpu preset needs CUDA; use --quick or --preset cpu on this machine")
    start = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {line}", flush=True)

    model = random_model(preset)
    results = {"preset": preset.name, "machine": report.machine(), "decisions": sections.MODES_NOTE,
               "shape": preset.shape.to_dict(), "page_size": preset.page_size,
               "prefill_chunk": preset.prefill_chunk, "clock": clock_name(preset.device)}  # fmt: skip
    log(f"{preset.name} on {results['machine']}; {sections.MODES_NOTE}; timing: {results['clock']}")
    for key, name, fn in (("a", "equal_batch", sections.equal_batch), ("b", "equal_memory", sections.equal_memory),
                          ("c", "prefill", sections.prefill), ("d", "hf_generate", sections.hf_generate)):  # fmt: skip
        results[name] = [] if key in args.skip else fn(model, preset, log)
    results["headline"] = report.headline(results)
    print("\n".join(["", "== headline ratios (" + sections.MODES_NOTE + ")", *results["headline"]]))
    json_path, png_path = report.write(results, args.out)
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - start:.0f}s")
    return results


if __name__ == "__main__":
    main()
