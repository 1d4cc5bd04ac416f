"""Evaluate one (model, method) end to end: both perplexity protocols and the tasks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from megatron_dmc.eval.caches import KVMethod
from megatron_dmc.eval.perplexity import continuation_perplexity, strided_perplexity
from megatron_dmc.eval.results import ResultRow, make_row


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
    protocols: tuple[str, ...] = field(default=("strided", "continuation"))


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
    strided = continuation = None
    if "strided" in s.protocols:
        strided = strided_perplexity(
            model, method, token_ids, s.window, s.stride, s.chunk, s.max_tokens, progress
        )
    if "continuation" in s.protocols:
        continuation = continuation_perplexity(
            model,
            method,
            token_ids,
            s.context_len,
            s.continuation_len,
            s.max_samples,
            progress=progress,
        )
    tasks = {}
    if s.tasks:
        from megatron_dmc.eval.lm_eval_adapter import run_tasks

        tasks = run_tasks(model, tokenizer, method, s.tasks, s.limit)
    row = make_row(method.name, method.compression_ratio, strided, continuation, tasks)
    if dense_kv_bytes is not None:
        row.dense_kv_bytes = dense_kv_bytes
    return row
