"""The `paged` decode backend: a small C++ kernel that reads each stream's pages in place.

Legend: B sequences, H query heads, G KV heads, N query heads per KV head, M pages per
stream, R streams (B * G), D head dim, W merge delay.

The kernel (csrc/paged_decode.cpp, in the extension of compiled.py) is compiled once at
install time by `python -m megatron_dmc.inference.paged_cpu --build` (scripts/setup.sh
runs it) into the asset cache, and loaded from there without a compiler. Where it was not built (or cannot
be), the backend says so once and runs `paged_attention_blocked`, the torch path with the
same page-blocked online softmax. With a merge delay the exact ring (a `RingBlock`) is one
more block of each stream's softmax inside the kernel.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import warnings
from functools import cache
from types import ModuleType

import torch
from torch.profiler import record_function

from megatron_dmc.inference import compiled
from megatron_dmc.inference.attention import RingBlock, paged_attention_blocked
from megatron_dmc.inference.decode import register_backend
from megatron_dmc.inference.kv_cache import PagedKVCache


@cache
def extension() -> ModuleType | None:
    """The built kernel, or None (with one warning) when it was not built."""
    module = compiled.load()
    if module is None:
        warnings.warn(
            "the compiled paged decode kernel is not built; decode uses the torch path "
            "(paged_attention_blocked). Build it with: python -m megatron_dmc.inference.paged_cpu "
            "--build",
            stacklevel=3,
        )
    return module


def paged_attention_inplace(
    q_BHD: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    seq_ids_B: torch.Tensor,
    ring: RingBlock | None = None,
) -> torch.Tensor:
    """Same contract as paged_attention_reference; CPU tensors. Falls back to the torch
    blocked path where the kernel is not built."""
    kernel = extension()
    if kernel is None or q_BHD.device.type != "cpu":
        return paged_attention_blocked(q_BHD, cache, layer, seq_ids_B, ring=ring)
    batch, num_heads, head_dim = q_BHD.shape
    num_groups = cache.config.num_kv_heads
    streams = batch * num_groups
    table_RM = cache.block_table_LBGM[layer, seq_ids_B].flatten(0, 1)
    lengths_R = cache.lengths_LBG[layer, seq_ids_B].flatten()
    q_RND = q_BHD.reshape(streams, num_heads // num_groups, head_dim)
    pool = cache.pool
    dtype = pool.k_pages_PND.dtype
    with record_function("kernel.paged_decode"):
        out_RND = kernel.paged_decode(
            q_RND.to(dtype), pool.k_pages_PND, pool.v_pages_PND, table_RM, lengths_R,
            *_ring_arguments(ring, batch, num_groups, head_dim, dtype), 1.0 / math.sqrt(head_dim),
        )  # fmt: skip
    return out_RND.view(batch, num_heads, head_dim).to(q_BHD.dtype)


def _ring_arguments(ring: RingBlock | None, batch: int, groups: int, head_dim: int, dtype):
    """The kernel's ring arguments: slabs [X*G, W, D], rows [R], cos / sin [B, W, D] and
    lengths [R]; an empty ring (W = 0) without a delay."""
    streams = batch * groups
    if ring is None:
        empty = torch.zeros(1, 0, head_dim, dtype=dtype)
        zeros_R = torch.zeros(streams, dtype=torch.long)
        table = torch.zeros(batch, 0, head_dim, dtype=dtype)
        return empty, empty, zeros_R, table, table, zeros_R
    slab_k, slab_v = (x.flatten(0, 1) for x in (ring.k_XGWD, ring.v_XGWD))
    g_G = torch.arange(groups, device=ring.seq_ids_B.device)
    rows_R = (ring.seq_ids_B[:, None] * groups + g_G).flatten()
    return (slab_k.to(dtype), slab_v.to(dtype), rows_R, ring.cos_BWD.to(dtype),
            ring.sin_BWD.to(dtype), ring.lengths_B.repeat_interleave(groups))  # fmt: skip


register_backend("paged", paged_attention_inplace)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="build the compiled paged decode kernel")
    parser.add_argument("--build", action="store_true", help="compile it (once) into the cache")
    args = parser.parse_args(argv)
    if not args.build:
        print(f"kernel {'built' if extension() else 'NOT built'}: {compiled.build_dir()}")
        return
    try:
        compiled.build(verbose=False)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
        last = str(error).strip().splitlines()[-1:] or [type(error).__name__]
        print(f"error: the paged decode kernel did not build ({last[0]})", file=sys.stderr)
        sys.exit(2)
    print(f"built the paged decode kernel in {compiled.build_dir()}")


if __name__ == "__main__":
    main()
