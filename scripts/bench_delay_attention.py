"""Delayed-merging attention: the fused `dmc_attention` against the explicit reference.

One forward per process (peak RSS is per process): CPU time and peak RSS growth.
Usage: python scripts/bench_delay_attention.py {fused,reference} T W
Legend: B batch, G KV heads (= query heads here), T time, D head dim.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from megatron_dmc.ops import attention_bias, dmc_attention, dmc_attention_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=("fused", "reference"))
    parser.add_argument("length", type=int)
    parser.add_argument("delay", type=int)
    args = parser.parse_args()
    torch.manual_seed(0)
    q_BGTD, kt_BGTD, vt_BGTD, k_BGTD, v_BGTD = (
        torch.randn(1, 8, args.length, 64) for _ in range(5)
    )
    alpha_BGT = (torch.rand(1, 8, args.length) > 0.5).float()
    bias_BGT = attention_bias(alpha_BGT, hard=True)
    attend = dmc_attention if args.which == "fused" else dmc_attention_reference
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.process_time()
    with torch.no_grad():
        attend(q_BGTD, kt_BGTD, vt_BGTD, bias_BGT, None, k_BGTD, v_BGTD, args.delay)
    seconds = time.process_time() - start
    extra_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"{args.which} T={args.length} W={args.delay}: {seconds:.2f} s CPU, +{extra_mib:.0f} MiB")


if __name__ == "__main__":
    main()
