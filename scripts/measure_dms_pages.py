"""Pages allocated vs slots held on a DMS decode: how dense the paged cache stays.

A random-weight DMS model (decision heads, or --forced CR: every head evicts at that rate,
FORCED, not a model's decisions) prefills 16 tokens per sequence and decodes; at each
checkpoint it prints the slots held (paged + exact ring), the pages the pool has handed
out, the fewest pages those slots could fit (sum over streams of ceil(slots / page)), the
pages a vanilla cache would hold, and `cache_stats`' fragmentation.
Usage: python scripts/measure_dms_pages.py [--steps N] [--window W] [--forced CR]
Legend: B sequences, T time, L layers, G KV heads.
"""

from __future__ import annotations

import argparse

import torch

from megatron_dmc.inference import PagedKVCache, cache_stats
from megatron_dmc.inference.decisions import ForcedRate
from megatron_dmc.inference.model import LlamaForInference
from megatron_dmc.ops import dms_config
from megatron_dmc.schema.llama import LlamaShape

PAGE = 16
BATCH = 4
PROMPT = 16


def build(window: int, forced: float | None) -> LlamaForInference:
    shape = LlamaShape(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=4096,
        dmc_decision_heads=True,
    )
    model = LlamaForInference(shape, dms_config(window), ForcedRate(forced) if forced else None)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.02 if "dmc_decision_proj" in name else 0.05
            p.normal_(0.0, std) if p.dim() > 1 else p.fill_(1.0)
    return model.eval()


def report(cache: PagedKVCache, seq_B: torch.Tensor) -> str:
    stats = cache_stats(cache)
    paged_LBG = cache.lengths_LBG[:, seq_B]
    tokens = int(cache.seen_LB[0, seq_B[0]])
    streams = paged_LBG.numel()
    fewest = int(((paged_LBG + PAGE - 1) // PAGE).sum())
    vanilla = streams * -(-tokens // PAGE)
    return (
        f"| {tokens} | {int(stats.lengths_LBG.sum())} | {int(paged_LBG.sum())} | "
        f"{cache.pool.pages_in_use} | {fewest} | {vanilla} | {stats.fragmentation:.3f} | "
        f"{stats.compression_ratio:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1008)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--forced", type=float, default=None)
    args = parser.parse_args()
    model = build(args.window, args.forced)
    length = PROMPT + args.steps
    pages = 2 * BATCH * 4 * -(-length // PAGE)
    cache = PagedKVCache(model.cache_config(pages, BATCH, length, page_size=PAGE))
    seq_B = cache.add_sequences(BATCH)
    gen = torch.Generator().manual_seed(1)
    tokens_BT = torch.randint(0, 128, (BATCH, length), generator=gen)
    model.prefill(tokens_BT[:, :PROMPT], torch.full((BATCH,), PROMPT), cache, seq_B)
    print("| tokens | slots held | paged slots | pages allocated | fewest pages | vanilla pages "
          "| fragmentation | CR |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for t in range(PROMPT, length):
        model.decode(tokens_BT[:, t], cache, seq_B, "blocked")
        if (t + 1) % 256 == 0 or t + 1 == length:
            print(report(cache, seq_B))


if __name__ == "__main__":
    main()
