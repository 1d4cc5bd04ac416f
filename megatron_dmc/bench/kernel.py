"""The paged decode kernel against the memory: one layer's attention vs a streaming read.

    python -m megatron_dmc.bench.kernel --batch 16 --context 2048

Legend: B sequences, G KV heads, N query heads per KV head, D head dim, R streams (B * G),
M pages per stream, P pages.

A vanilla cache of SmolLM2-135M's attention shape (3 KV heads, 3 query heads each, head
dim 64, pages of `--page-size` 16, fp32) filled with random keys and values, every stream
`--context` tokens long on its own pages in `--order` (ascending, descending or random); `--layers` such layers so that they do not fit in the CPU's
caches. Times (process CPU time, one thread, best of `--reps`) the compiled kernel, the
torch `blocked` backend, and `torch.sum` over the same key and value bytes (the memory
read a kernel cannot beat), per layer.
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_dmc.inference import CacheConfig, PagedKVCache, paged_cpu
from megatron_dmc.inference.attention import paged_attention_blocked

ORDERS = ("ascending", "descending", "random")
"""Where a stream's pages lie: in address order (what the pool hands out), backwards, or
anywhere in the pool (pages taken during decode interleave between streams)."""


def layered_cache(batch: int, context: int, layers: int, groups=3, dim=64, page=16,
                  order="ascending") -> PagedKVCache:  # fmt: skip
    """Every (layer, sequence, KV head) stream `context` tokens of random keys / values, its
    pages in `order`."""
    width = -(-context // page)
    config = CacheConfig(num_layers=layers, num_kv_heads=groups, head_dim=dim, compress=False,
                         num_pages=layers * batch * groups * width, max_batch=batch,
                         max_seq_len=width * page, page_size=page)  # fmt: skip
    cache = PagedKVCache(config)
    cache.add_sequences(batch)
    cache.pool.k_pages_PND.normal_()
    cache.pool.v_pages_PND.normal_()
    pages_P = torch.arange(config.num_pages)
    if order == "random":
        pages_P = pages_P[
            torch.randperm(config.num_pages, generator=torch.Generator().manual_seed(0))
        ]
    table_LBGM = pages_P.view(layers, batch, groups, -1)
    cache.block_table_LBGM[:] = table_LBGM.flip(-1) if order == "descending" else table_LBGM
    cache.lengths_LBG[:] = context
    return cache


def best_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * min(times)


def measure(batch: int, context: int, layers: int, reps: int, page: int = 16,
            order: str = "ascending") -> dict[str, float]:  # fmt: skip
    """ms per layer of the kernel, the blocked torch path and a streaming read."""
    cache = layered_cache(batch, context, layers, page=page, order=order)
    seq_ids_B = torch.arange(batch)
    q_BHD = torch.randn(batch, 9, 64)

    def every_layer(attention):
        return lambda: [attention(q_BHD, cache, layer, seq_ids_B) for layer in range(layers)]

    pool = cache.pool

    def streaming_read():
        return pool.k_pages_PND.sum(), pool.v_pages_PND.sum()

    result = {
        "kernel": best_ms(every_layer(paged_cpu.paged_attention_inplace), reps) / layers,
        "blocked": best_ms(every_layer(paged_attention_blocked), reps) / layers,
        "streaming read": best_ms(streaming_read, reps) / layers,
    }
    result["bytes per layer"] = 2 * batch * 3 * context * 64 * 4
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--order", choices=ORDERS, default="ascending",
                   help="where each stream's pages lie in the pool")  # fmt: skip
    args = p.parse_args(argv)
    if min(args.batch, args.context, args.layers, args.reps, args.page_size) < 1:
        raise SystemExit("error: --batch, --context, --layers, --reps, --page-size must be >= 1")
    if paged_cpu.extension() is None:
        raise SystemExit(
            "error: build the kernel first: python -m megatron_dmc.inference.paged_cpu --build"
        )
    torch.set_num_threads(1)
    result = measure(args.batch, args.context, args.layers, args.reps, args.page_size, args.order)
    size = result.pop("bytes per layer")
    for name, ms in result.items():
        print(f"{name:15s} {ms:7.2f} ms / layer  {size / ms / 1e6:6.2f} GB/s")
    print(f"kernel / streaming read: {result['kernel'] / result['streaming read']:.2f}x")


if __name__ == "__main__":
    main()
