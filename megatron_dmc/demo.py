"""The main job on an embedded default. Run: python -m megatron_dmc.demo

Today: a smoke of the DMC core on random heads — the parallel training-form attention in
eval mode against Algorithm 1 run token by token, with the compression each head reaches.
"""

from __future__ import annotations

import argparse

import torch

from megatron_dmc.ops import DMCConfig, dmc_self_attention, dmc_sequential_reference, rope_cos_sin


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--merge-rate", type=float, default=0.5)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    q_BHTD = torch.randn(1, 6, args.seq_length, 16, generator=gen, dtype=torch.float64)
    k_BGTD = torch.randn(1, 2, args.seq_length, 16, generator=gen, dtype=torch.float64)
    v_BGTD = torch.randn(1, 2, args.seq_length, 16, generator=gen, dtype=torch.float64)
    merge_BGT = torch.rand(1, 2, args.seq_length, generator=gen) < args.merge_rate
    k_BGTD[..., -1] = 5.0 + torch.where(merge_BGT, 1.0, -1.0).double()
    cos_TD, sin_TD = rope_cos_sin(torch.arange(args.seq_length), 16, 10000.0, torch.float64)
    config = DMCConfig()
    parallel, _ = dmc_self_attention(q_BHTD, k_BGTD, v_BGTD, cos_TD, sin_TD, config, False)
    sequential, lengths_BG = dmc_sequential_reference(
        q_BHTD, k_BGTD, v_BGTD, cos_TD, sin_TD, config
    )
    error = float((parallel - sequential).abs().max() / sequential.abs().max())
    print(f"parallel vs Algorithm 1: max relative error {error:.2e}")
    for head, length in enumerate(lengths_BG[0].tolist()):
        print(
            f"KV head {head}: {args.seq_length} tokens -> {length} slots, CR {args.seq_length / length:.2f}"
        )


if __name__ == "__main__":
    main()
