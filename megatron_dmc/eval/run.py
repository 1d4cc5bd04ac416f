"""Evaluate one (model, method) end to end: the perplexity protocols and the tasks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from megatron_dmc.eval.caches import KVMethod
from megatron_dmc.eval.matched import (
    MATCHED_CHUNK,
    matched_continuation_perplexity,
    matched_strided_perplexity,
)
from megatron_dmc.eval.perplexity import continuation_perplexity, strided_perplexity
from megatron_dmc.eval.results import ResultRow, make_row

PROTOCOLS = ("strided", "continuation", "matched_strided", "matched_continuation")
"""Today's protocols (perplexity.py) and their matched forms (matched.py)."""


@dataclass
class EvalSettings:
    """What to measure and how much of it (defaults: the CPU preset)."""

    context_len: int = 1024
    """Continuation protocol: tokens compressed before scoring."""
    continuation_len: int = 128
    """Continuation protocol: tokens scored after the context."""
    max_samples: int | None = 8
    """Continuation protocol: disjoint samples scored (None: all the text holds)."""
    window: int = 1024
    """Whole-sequence protocol: window length (the budget of an eviction method is window/CR)."""
    stride: int = 512
    """Whole-sequence protocol: window step."""
    chunk: int | None = 32
    """Whole-sequence protocol: tokens per forward call through the cache."""
    max_tokens: int | None = 8192
    """Whole-sequence protocol: held-out tokens scored (None: all)."""
    tasks: tuple[str, ...] = ()
    """lm-eval tasks to score (empty: none)."""
    limit: int | None = 100
    """Documents per task (per MMLU subject); None: all."""
    protocols: tuple[str, ...] = field(default=PROTOCOLS)
    """Perplexity protocols to run, from PROTOCOLS."""
    matched_chunk: int = MATCHED_CHUNK
    """Matched protocols: tokens per call; the budget is enforced after every call."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.protocols) - set(PROTOCOLS))
        if unknown:
            raise ValueError(f"unknown protocols {unknown}; choose from {', '.join(PROTOCOLS)}")
        if self.matched_chunk < 1:
            raise ValueError(f"matched_chunk must be >= 1 token; got {self.matched_chunk}")


def evaluate(
    model: nn.Module,
    tokenizer,
    method: KVMethod,
    token_ids: torch.Tensor,
    settings: EvalSettings | None = None,
    dense_kv_bytes: int | None = None,
    progress: bool = True,
) -> ResultRow:
    """A results row for `method` on `model` over held-out `token_ids` (1-D)."""
    s = settings or EvalSettings()
    results = [_perplexity(protocol, model, method, token_ids, s, progress)
               for protocol in PROTOCOLS if protocol in s.protocols]  # fmt: skip
    tasks = {}
    if s.tasks:
        from megatron_dmc.eval.lm_eval_adapter import run_tasks

        tasks = run_tasks(model, tokenizer, method, s.tasks, s.limit)
    return make_row(method.name, method.compression_ratio, results, tasks, dense_kv_bytes)


def _perplexity(protocol: str, model, method, token_ids, s: EvalSettings, progress: bool):
    if protocol == "strided":
        return strided_perplexity(
            model, method, token_ids, s.window, s.stride, s.chunk, s.max_tokens, progress
        )
    if protocol == "continuation":
        return continuation_perplexity(
            model, method, token_ids, s.context_len, s.continuation_len, s.max_samples,
            progress=progress,
        )  # fmt: skip
    if protocol == "matched_strided":
        return matched_strided_perplexity(
            model, method, token_ids, s.window, s.stride, s.matched_chunk, s.max_tokens, progress
        )
    return matched_continuation_perplexity(
        model, method, token_ids, s.context_len, s.continuation_len, s.max_samples,
        s.matched_chunk, progress,
    )  # fmt: skip
