"""One eval-mode layer forward, DMC (heads, window 12) beside DMS (one-token slots), same W.

CPU time per forward, the two methods alternated in one process (repeat 2).
Usage: python scripts/bench_dms_forward.py T W
Legend: B batch, H query heads, G KV heads, T time, D head dim, C attention input width.
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_dmc.ops import (
    DMCConfig,
    decision_head_logits,
    dmc_self_attention,
    dms_config,
    rope_cos_sin,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("length", type=int)
    parser.add_argument("window", type=int)
    args = parser.parse_args()
    torch.manual_seed(0)
    t, d = args.length, 64
    q_BHTD, k_BGTD, v_BGTD = (torch.randn(1, 8, t, d) for _ in range(3))
    logits = decision_head_logits(torch.randn(1, t, d), 0.01 * torch.randn(16, d), 5.0)
    cos_TD, sin_TD = rope_cos_sin(torch.arange(t), d, 10000.0)
    configs = {
        "dmc": DMCConfig(decision_source="heads", merge_delay=args.window),
        "dms": dms_config(args.window),
    }
    for name in [*configs, *configs]:
        start = time.process_time()
        with torch.no_grad():
            dmc_self_attention(
                q_BHTD, k_BGTD, v_BGTD, cos_TD, sin_TD, configs[name], False, logits=logits
            )
        print(f"{name} T={t} W={args.window}: {time.process_time() - start:.2f} s CPU")


if __name__ == "__main__":
    main()
