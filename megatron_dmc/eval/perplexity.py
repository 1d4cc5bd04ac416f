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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

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


@dataclass
class SampleScore:
    """What one sample (a context + continuation block, or a window) contributes."""

    nll: float
    """Summed negative log-likelihood of the scored tokens."""
    scored: int
    """Tokens scored."""
    seen: int
    """Tokens the cache saw."""
    kv_bytes: int
    """Bytes the cache held after the sample's context."""
    peak_kv_bytes: int
    slots: float
    """Mean slots per (layer, KV head) the last scored token attended."""


def evaluate_samples(
    protocol: str,
    model: nn.Module,
    method: KVMethod,
    samples: Sequence[Any],
    score_sample: Callable[[Any], SampleScore],
    dense_len: int,
    settings: dict,
    progress: bool = False,
) -> PerplexityResult:
    """Run `score_sample` over `samples` and sum them into one result of `protocol`."""
    nll, scored, seen, held, peak, slots = 0.0, 0, 0, 0, 0, 0.0
    for sample in tqdm(samples, desc=f"{protocol} ({method.name})", disable=not progress):
        one = score_sample(sample)
        nll, scored, seen = nll + one.nll, scored + one.scored, seen + one.seen
        held, peak, slots = held + one.kv_bytes, max(peak, one.peak_kv_bytes), slots + one.slots
    return PerplexityResult(
        protocol,
        method.name,
        method.compression_ratio,
        nll / scored,
        scored,
        held // len(samples),
        peak,
        dense_kv_bytes(model, dense_len),
        settings,
        seen / slots,
    )


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
    blocks = _blocks(token_ids, context_len + continuation_len, max_samples)

    def score_block(block_T: torch.Tensor) -> SampleScore:
        prefix = prefill(model, method, block_T[:context_len], prefill_chunk)
        scored = score(model, prefix, block_T[context_len:], score_chunk)
        slots = mean_slots(slots_attended(prefix.cache))
        nll = -float(scored.logprobs_T.sum())
        return SampleScore(
            nll, continuation_len, len(block_T), prefix.kv_bytes, scored.peak_kv_bytes, slots
        )

    settings = dict(
        context_len=context_len,
        continuation_len=continuation_len,
        samples=len(blocks),
        prefill_chunk=prefill_chunk,
        score_chunk=score_chunk,
    )
    return evaluate_samples(
        "continuation", model, method, blocks, score_block, context_len, settings, progress
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


def strided_spans(
    token_ids: torch.Tensor, window: int, stride: int, max_tokens: int | None
) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """The tokens a strided protocol reads (cut to `max_tokens`) and its `_windows`."""
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window; got stride={stride}, window={window}")
    token_ids = token_ids[:max_tokens] if max_tokens else token_ids
    if len(token_ids) < 2:
        raise ValueError("need at least 2 held-out tokens to score one")
    return token_ids, _windows(len(token_ids), window, stride)


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
    token_ids, spans = strided_spans(token_ids, window, stride, max_tokens)

    def score_window(span: tuple[int, int, int]) -> SampleScore:
        begin, end, scored_len = span
        ids_T = token_ids[begin:end]
        prefix = prefill(model, method, ids_T[:1], budget_tokens=window)
        scored = score(model, prefix, ids_T[1:], chunk)
        slots = mean_slots(slots_attended(prefix.cache))
        nll = -float(scored.logprobs_T[-scored_len:].sum())
        return SampleScore(
            nll, scored_len, end - begin, scored.kv_bytes, scored.peak_kv_bytes, slots
        )

    settings = dict(window=window, stride=stride, chunk=chunk, windows=len(spans))
    return evaluate_samples(
        "strided", model, method, spans, score_window, window, settings, progress
    )
