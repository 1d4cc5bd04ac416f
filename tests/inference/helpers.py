"""Single-layer drivers and random DMC inputs for the inference tests (fp64 unless stated)."""

from __future__ import annotations

import torch

from megatron_dmc.inference import CacheConfig, PagedKVCache
from megatron_dmc.inference.attention import RingBlock
from megatron_dmc.inference.delay import DecodeStep
from megatron_dmc.inference.delayed_prefill import delayed_chunk_attention
from megatron_dmc.inference.prefill import prefill_attention
from megatron_dmc.ops import DMCConfig, rope_cos_sin

INIT_VALUE = 5.0
DMC = DMCConfig(window_size=12, init_val=INIT_VALUE)


def random_qkv(batch, heads, groups, length, head_dim, merge_prob=0.6, seed=0, dtype=torch.float64):
    """Raw pre-RoPE q, k, v whose channel D-1 encodes random merges; long runs included."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, groups, length, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, groups, length, head_dim, generator=gen, dtype=dtype)
    merge = torch.rand(batch, groups, length, generator=gen) < merge_prob
    merge[..., length // 3 : length // 3 + 20] = True  # one run longer than the window
    margin = 0.1 + torch.rand(batch, groups, length, generator=gen, dtype=dtype)
    k[..., -1] = INIT_VALUE + torch.where(merge, margin, -margin)
    q[..., -1] = 3.0 * torch.randn(batch, heads, length, generator=gen, dtype=dtype) - 4.0
    return q, k, v


def random_ring(batch, groups, window, head_dim, dtype, seen_B, seed=7):
    """A RingBlock over a random slab of batch + 2 rows (read at shuffled rows), random RoPE
    positions; seen_B tokens seen per sequence (the valid prefix is min(seen, W))."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch + 2, groups, window, head_dim)
    k = torch.randn(shape, generator=gen, dtype=dtype)
    v = torch.randn(shape, generator=gen, dtype=dtype)
    positions = torch.randint(0, 500, (batch * window,), generator=gen)
    cos, sin = rope_cos_sin(positions, head_dim, 10000.0, dtype)
    seq_ids = torch.randperm(batch + 2, generator=gen)[:batch]
    lengths = torch.tensor(seen_B).clamp_max(window)
    return RingBlock(k, v, seq_ids, cos.view(batch, window, -1), sin.view(batch, window, -1),
                     lengths)  # fmt: skip


def make_cache(
    batch,
    groups,
    head_dim,
    max_len,
    page_size=4,
    compress=True,
    dtype=torch.float64,
    layers=1,
    num_pages=None,
    window=12,
    decision_channel=True,
    merge_delay=0,
):
    pages = num_pages or layers * batch * groups * (-(-max_len // page_size))
    config = CacheConfig(
        num_layers=layers,
        num_kv_heads=groups,
        head_dim=head_dim,
        num_pages=pages,
        max_batch=batch,
        max_seq_len=max_len,
        page_size=page_size,
        compress=compress,
        dtype=dtype,
        window=window,
        decision_channel=decision_channel,
        merge_delay=merge_delay,
    )
    return PagedKVCache(config)


def run_layer(
    q,
    k,
    v,
    lengths,
    prefill_len,
    chunk=None,
    page_size=4,
    backend="padded",
    dmc=DMC,
    forced=None,
    logits=None,
):
    """Outputs [B, H, T, D] of one layer: parallel prefill of the first tokens (optionally in
    chunks), then token-by-token decode. lengths[b] = tokens of sequence b (right padded).
    `logits` (DecisionLogits [B, G, T]) are the decision heads' in heads mode."""
    batch, _, length, head_dim = q.shape
    cache = make_cache(
        batch,
        k.shape[1],
        head_dim,
        length,
        page_size,
        dmc is not None,
        q.dtype,
        window=dmc.window_size if dmc else 12,
        decision_channel=dmc.uses_channel if dmc else True,
        merge_delay=dmc.merge_delay if dmc else 0,
    )
    seq = cache.add_sequences(batch)
    cos, sin = rope_cos_sin(torch.arange(length), head_dim, 10000.0, q.dtype)
    out = torch.zeros_like(q)
    prompt = lengths.clamp(max=prefill_len)
    step = chunk or prefill_len
    for start in range(0, prefill_len, step):
        end = min(start + step, prefill_len)
        pos = torch.arange(start, end).expand(batch, -1)
        n = (prompt - start).clamp(0, end - start)
        sl = slice(start, end)
        if dmc is not None and dmc.merge_delay and start > 0:
            out[:, :, sl] = delayed_chunk_attention(
                q[:, :, sl],
                k[:, :, sl],
                v[:, :, sl],
                start,
                cos[sl],
                sin[sl],
                lambda p: (cos[p], sin[p]),
                cache,
                0,
                seq,
                dmc,
                forced,
                _slice(logits, slice(None), sl),
            )
            continue
        out[:, :, sl] = prefill_attention(
            q[:, :, sl],
            k[:, :, sl],
            v[:, :, sl],
            pos,
            cos[sl].expand(batch, -1, -1),
            sin[sl].expand(batch, -1, -1),
            cache,
            0,
            seq,
            n,
            dmc,
            forced,
            _slice(logits, slice(None), sl),
        )
    for t in range(prefill_len, length):
        live = (lengths > t).nonzero().flatten()
        pos = torch.full((live.numel(),), t)
        step = DecodeStep(pos, cos[pos], sin[pos], lambda p: (cos[p], sin[p]), dmc, forced)
        out[live, :, t] = step.attend(
            q[live, :, t],
            k[live, :, t],
            v[live, :, t],
            _slice(logits, live, slice(t, t + 1)),
            cache,
            0,
            seq[live],
            backend,
        )
    return out, cache


def _slice(logits, rows, times):
    if logits is None:
        return None
    return type(logits)(*(x[rows][:, :, times] for x in logits))


def long_vanilla_cache(batch: int, groups: int, length: int, dim: int):
    """(cache, seq ids): one layer of `batch` uncompressed streams of `length` tokens, every
    page assigned in order (contents as allocated), for the backends' memory tests."""
    from megatron_dmc.inference import CacheConfig, PagedKVCache

    config = CacheConfig(num_layers=1, num_kv_heads=groups, head_dim=dim, compress=False,
                         num_pages=batch * groups * length // 16, max_batch=batch,
                         max_seq_len=length)  # fmt: skip
    cache = PagedKVCache(config)
    seq = cache.add_sequences(batch)
    cache.block_table_LBGM[0] = torch.arange(config.num_pages).view(batch, groups, -1)
    cache.lengths_LBG[0] = length
    return cache, seq
