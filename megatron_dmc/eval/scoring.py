"""Scoring and greedy generation through a KV method's cache, shared by the perplexity
protocols and the lm-eval adapter so that every method is measured by the same code.

Shapes: T tokens, V vocabulary. Token ids are 1-D (one sequence).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Cache

from megatron_dmc.eval.caches import (
    EngineCache,
    KVMethod,
    forward_cached,
    kv_bytes,
    peak_kv_bytes,
)


@dataclass
class Prefix:
    """A context run through a cache: what the cache holds and the next-token log-probs."""

    cache: Cache | EngineCache
    next_logprobs_V: torch.Tensor
    kv_bytes: int
    peak_kv_bytes: int


@dataclass
class Scored:
    """Log-probabilities of a continuation given a prefix."""

    logprobs_T: torch.Tensor
    greedy_T: torch.Tensor
    """True where the continuation token is the argmax of its distribution."""
    kv_bytes: int
    """Bytes the cache holds after the continuation."""
    peak_kv_bytes: int


def _chunks(ids_T: torch.Tensor, chunk: int | None) -> list[torch.Tensor]:
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens or None; got {chunk}")
    return list(ids_T.split(chunk or len(ids_T)))


@torch.no_grad()
def prefill(
    model: nn.Module,
    method: KVMethod,
    context_T: torch.Tensor,
    chunk: int | None = None,
    budget_tokens: int | None = None,
) -> Prefix:
    """Run the context through a fresh cache of `method`, `chunk` tokens per call (None: one).

    A budgeted method sizes its cache for `budget_tokens` (default: the context length).
    """
    if len(context_T) == 0:
        raise ValueError("the context must hold at least one token (prepend BOS/EOS)")
    cache = method.make_cache(model, budget_tokens or len(context_T))
    peak = 0
    for piece_T in _chunks(context_T, chunk):
        logprobs_1TV, cache = forward_cached(model, piece_T[None], cache)
        peak = max(peak, peak_kv_bytes(cache))
    return Prefix(cache, logprobs_1TV[0, -1], kv_bytes(cache), peak)


@torch.no_grad()
def score(
    model: nn.Module, prefix: Prefix, continuation_T: torch.Tensor, chunk: int | None = None
) -> Scored:
    """Log-probability of each continuation token given the prefix; extends prefix.cache."""
    cache, peak = prefix.cache, prefix.peak_kv_bytes
    dists = [prefix.next_logprobs_V[None]]
    for piece_T in _chunks(continuation_T, chunk):
        logprobs_1TV, cache = forward_cached(model, piece_T[None], cache)
        dists.append(logprobs_1TV[0])
        peak = max(peak, peak_kv_bytes(cache))
    dist_TV = torch.cat(dists)[: len(continuation_T)]
    logprobs_T = dist_TV.gather(1, continuation_T[:, None])[:, 0]
    return Scored(logprobs_T, dist_TV.argmax(-1) == continuation_T, kv_bytes(cache), peak)


@torch.no_grad()
def greedy_generate(
    model: nn.Module, prefix: Prefix, max_new_tokens: int, stop: Callable[[list[int]], bool]
) -> list[int]:
    """Greedy decoding, one token per call through the prefix's cache, until `stop(tokens)`."""
    out, next_V, cache = [], prefix.next_logprobs_V, prefix.cache
    for _ in range(max_new_tokens):
        out.append(int(next_V.argmax()))
        if stop(out):
            break
        token = out[-1]
        token_11 = torch.tensor([[token]], device=next_V.device)
        logprobs_1TV, cache = forward_cached(model, token_11, cache)
        next_V = logprobs_1TV[0, -1]
    return out
