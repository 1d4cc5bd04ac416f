"""The matched protocols: every method held to the same KV slots over the same tokens.

Each sample (continuation: context + continuation; whole-sequence: each window) goes
through a fresh cache from its first token, in calls of at most `chunk` tokens (default
64, the delay window of the efficient DMC recipe). A budgeted method (H2O, TOVA) makes
its cache with a budget that follows the tokens seen (`make_cache(model, None)`): after
every call each layer keeps at most ceil(seen / CR) slots per KV head, its recent window
included, which is what DMC's target allows; its scores accumulate from the first token
(H2O) or come from the newest query (TOVA), as in the papers. DMC compresses as tokens
arrive, through the same calls; a dense method keeps every token. Within a call, the
call's own tokens see each other exactly (up to `chunk` slots more than the budget);
the real CR counts them.

Shapes: T tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Cache

from megatron_dmc.eval.caches import KVMethod, forward_cached, kv_bytes, peak_kv_bytes
from megatron_dmc.eval.perplexity import (
    PerplexityResult,
    SampleScore,
    _blocks,
    evaluate_samples,
    strided_spans,
)
from megatron_dmc.eval.slots import mean_slots, slots_attended

MATCHED_CHUNK = 64
"""Tokens per call: the delay window of the efficient DMC recipe."""

OnBoundary = Callable[[Cache, int], None]
"""Called after every call with the cache and the tokens seen so far."""


@dataclass
class Streamed:
    """One sample run through a fresh cache in chunks."""

    logprobs_T: torch.Tensor
    """Log-probability of every token after the first, given the tokens before it."""
    kv_bytes: int
    """Bytes held at the end."""
    peak_kv_bytes: int
    slots: float
    """Mean slots per (layer, KV head) the last token attended."""


@torch.no_grad()
def stream(
    model: nn.Module,
    method: KVMethod,
    ids_T: torch.Tensor,
    chunk: int = MATCHED_CHUNK,
    on_boundary: OnBoundary | None = None,
) -> Streamed:
    """Run `ids_T` through a fresh cache whose budget follows the tokens seen, `chunk`
    tokens per call, and score every token after the first."""
    cache, peak, scored = method.make_cache(model, None), 0, []
    for begin in range(0, len(ids_T), chunk):
        piece_T = ids_T[begin : begin + chunk]
        logprobs_1TV, cache = forward_cached(model, piece_T[None], cache)
        targets_T = ids_T[begin + 1 : begin + len(piece_T) + 1]
        scored.append(logprobs_1TV[0, : len(targets_T)].gather(1, targets_T[:, None])[:, 0])
        peak = max(peak, peak_kv_bytes(cache))
        if on_boundary is not None:
            on_boundary(cache, begin + len(piece_T))
    slots = mean_slots(slots_attended(cache))
    return Streamed(torch.cat(scored), kv_bytes(cache), peak, slots)


def _check_chunk(chunk: int) -> None:
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens; got {chunk}")


def matched_continuation_perplexity(
    model: nn.Module,
    method: KVMethod,
    token_ids: torch.Tensor,
    context_len: int = 1024,
    continuation_len: int = 128,
    max_samples: int | None = None,
    chunk: int = MATCHED_CHUNK,
    progress: bool = False,
    on_boundary: OnBoundary | None = None,
) -> PerplexityResult:
    """Score the `continuation_len` tokens after each context, the whole sample compressed."""
    _check_chunk(chunk)
    blocks = _blocks(token_ids, context_len + continuation_len, max_samples)

    def score_block(block_T: torch.Tensor) -> SampleScore:
        run = stream(model, method, block_T, chunk, on_boundary)
        return _sample_score(run, context_len - 1, continuation_len, len(block_T))

    settings = dict(context_len=context_len, continuation_len=continuation_len,
                    samples=len(blocks), chunk=chunk)  # fmt: skip
    sample_len = context_len + continuation_len
    return evaluate_samples(
        "matched_continuation", model, method, blocks, score_block, sample_len, settings, progress
    )


def matched_strided_perplexity(
    model: nn.Module,
    method: KVMethod,
    token_ids: torch.Tensor,
    window: int = 1024,
    stride: int = 512,
    chunk: int = MATCHED_CHUNK,
    max_tokens: int | None = None,
    progress: bool = False,
    on_boundary: OnBoundary | None = None,
) -> PerplexityResult:
    """Whole-sequence perplexity with overlapping windows, each window compressed from its
    first token."""
    _check_chunk(chunk)
    token_ids, spans = strided_spans(token_ids, window, stride, max_tokens)

    def score_window(span: tuple[int, int, int]) -> SampleScore:
        begin, end, scored_len = span
        run = stream(model, method, token_ids[begin:end], chunk, on_boundary)
        return _sample_score(run, len(run.logprobs_T) - scored_len, scored_len, end - begin)

    settings = dict(window=window, stride=stride, chunk=chunk, windows=len(spans))
    return evaluate_samples(
        "matched_strided", model, method, spans, score_window, window, settings, progress
    )


def _sample_score(run: Streamed, first: int, scored: int, seen: int) -> SampleScore:
    """The sample's contribution, scoring `run`'s log-probabilities from index `first` on."""
    nll = -float(run.logprobs_T[first:].sum())
    return SampleScore(nll, scored, seen, run.kv_bytes, run.peak_kv_bytes, run.slots)
