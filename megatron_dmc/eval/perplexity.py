"""Perplexity of a causal LM under a KV method, two protocols, one code path (scoring.py).

- strided: the whole held-out stream in windows of `window` tokens moved by `stride`;
  each token is scored once, with up to `window - stride` tokens of context; the window
  is fed through the method's cache `chunk` tokens per call, so a budgeted method
  compresses while the scored tokens are read (fixed budget = window / CR, so it holds
  every token until the budget fills).
- continuation (the paper's): a `context_len`-token context goes through the cache
  (budget = context_len / CR), then the next `continuation_len` tokens are scored against
  what the cache kept. An eviction method compresses after a dense prefill and scores the
  continuation uncompressed.

The matched forms of both, with every method held to the same slots, are in matched.py.
Every result reports its real CR (slots.py) and the most KV bytes held at any moment.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from megatron_dmc.eval.caches import KVMethod, dense_kv_bytes
from megatron_dmc.eval.scoring import prefill, score
from megatron_dmc.eval.slots import mean_slots, slots_attended


@dataclass
class PerplexityResult:
    """Mean negative log-likelihood per scored token and what the cache held."""

    protocol: str
    method: str
    compression_ratio: float
    nll: float
    tokens: int
    kv_bytes: int
    """Bytes the cache held after each context (mean over samples)."""
    peak_kv_bytes: int
    """Most bytes held at any measured moment, transient prefill growth included."""
    dense_kv_bytes: int
    """A dense cache of the same context, for comparison."""
    settings: dict = field(default_factory=dict)
    real_cr: float | None = None
    """Tokens seen / slots the last scored token attended, summed over samples (slots:
    mean per layer and KV head, the recent exact tokens included)."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity}


def _blocks(token_ids: torch.Tensor, size: int, max_samples: int | None) -> list[torch.Tensor]:
    count = len(token_ids) // size
    if max_samples is not None:
        count = min(count, max_samples)
    if count == 0:
        raise ValueError(
            f"need at least {size} held-out tokens for one sample; got {len(token_ids)}: "
            "give more text or shorten the context"
        )
    return list(token_ids[: count * size].view(count, size))


def continuation_perplexity(
    model: nn.Module,
    method: KVMethod,
    token_ids: torch.Tensor,
    context_len: int = 1024,
    continuation_len: int = 128,
    max_samples: int | None = None,
    prefill_chunk: int | None = None,
    score_chunk: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Compress a context, score the tokens after it; samples are disjoint blocks."""
    nll, held, peak, slots = 0.0, 0, 0, 0.0
    blocks = _blocks(token_ids, context_len + continuation_len, max_samples)
    for block_T in tqdm(blocks, desc=f"continuation ppl ({method.name})", disable=not progress):
        prefix = prefill(model, method, block_T[:context_len], prefill_chunk)
        scored = score(model, prefix, block_T[context_len:], score_chunk)
        nll -= float(scored.logprobs_T.sum())
        held, peak = held + prefix.kv_bytes, max(peak, scored.peak_kv_bytes)
        slots += mean_slots(slots_attended(prefix.cache))
    settings = dict(
        context_len=context_len,
        continuation_len=continuation_len,
        samples=len(blocks),
        prefill_chunk=prefill_chunk,
        score_chunk=score_chunk,
    )
    return PerplexityResult(
        "continuation",
        method.name,
        method.compression_ratio,
        nll / (len(blocks) * continuation_len),
        len(blocks) * continuation_len,
        held // len(blocks),
        peak,
        dense_kv_bytes(model, context_len),
        settings,
        len(blocks) * (context_len + continuation_len) / slots,
    )


def _windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window: score the last `scored` tokens of [begin, end)."""
    spans, prev_end = [], 0
    for begin in range(0, length - 1, stride):
        end = min(begin + window, length)
        spans.append((begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == length:
            break
    return spans


def strided_perplexity(
    model: nn.Module,
    method: KVMethod,
    token_ids: torch.Tensor,
    window: int = 1024,
    stride: int = 512,
    chunk: int | None = 32,
    max_tokens: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Whole-sequence perplexity with overlapping windows, every window through the cache."""
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window; got stride={stride}, window={window}")
    token_ids = token_ids[:max_tokens] if max_tokens else token_ids
    if len(token_ids) < 2:
        raise ValueError("need at least 2 held-out tokens to score one")
    nll, count, held, peak, seen, slots = 0.0, 0, 0, 0, 0, 0.0
    spans = _windows(len(token_ids), window, stride)
    for begin, end, scored_len in tqdm(
        spans, desc=f"strided ppl ({method.name})", disable=not progress
    ):
        ids_T = token_ids[begin:end]
        prefix = prefill(model, method, ids_T[:1], budget_tokens=window)
        scored = score(model, prefix, ids_T[1:], chunk)
        nll -= float(scored.logprobs_T[-scored_len:].sum())
        count += scored_len
        held, peak = held + scored.kv_bytes, max(peak, scored.peak_kv_bytes)
        seen, slots = seen + end - begin, slots + mean_slots(slots_attended(prefix.cache))
    settings = dict(window=window, stride=stride, chunk=chunk, windows=len(spans))
    return PerplexityResult(
        "strided",
        method.name,
        method.compression_ratio,
        nll / count,
        count,
        held // len(spans),
        peak,
        dense_kv_bytes(model, window),
        settings,
        seen / slots,
    )
