"""Evaluate one (model, method) end to end: both perplexity protocols and the tasks.

Tasks: the lm-eval tasks of `task_files.ALL_TASKS` (MMLU optionally on the seeded subset
of `mmlu_subset`) and the generation tasks `humaneval` (pass@1, completions run in the
sandbox) and `needle` (RULER-style retrieval), all through the method's cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from megatron_dmc.eval.caches import KVMethod
from megatron_dmc.eval.humaneval import HumanEvalSettings
from megatron_dmc.eval.matched import (
    MATCHED_CHUNK,
    matched_continuation_perplexity,
    matched_strided_perplexity,
)
from megatron_dmc.eval.needle import NeedleSettings
from megatron_dmc.eval.perplexity import continuation_perplexity, strided_perplexity
from megatron_dmc.eval.results import ResultRow, make_row
from megatron_dmc.eval.task_files import ALL_TASKS

GENERATION_TASKS = ("humaneval", "needle")
"""Tasks scored by generating through the cache (not lm-eval log-likelihoods)."""

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
    """Tasks to score (empty: none): lm-eval tasks, humaneval, needle."""
    limit: int | None = 100
    """Documents per lm-eval task (per MMLU subject); None: all."""
    mmlu_per_subject: int | None = None
    """MMLU on the seeded subset of this many questions per subject (None: `limit`)."""
    humaneval: HumanEvalSettings = field(default_factory=HumanEvalSettings)
    """HumanEval: problems, generation length, sandbox limits."""
    needle: NeedleSettings = field(default_factory=NeedleSettings)
    """Retrieval: tasks, lengths, depths, samples."""
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
        unknown_tasks = sorted(set(self.tasks) - set(ALL_TASKS) - set(GENERATION_TASKS))
        if unknown_tasks:
            known = ", ".join((*ALL_TASKS, *GENERATION_TASKS))
            raise ValueError(f"unknown tasks {unknown_tasks}; choose from {known}")
        if self.mmlu_per_subject is not None and self.mmlu_per_subject < 1:
            raise ValueError(f"mmlu_per_subject must be >= 1 question; got {self.mmlu_per_subject}")


def _lm_eval_tasks(model, tokenizer, method, s: EvalSettings) -> dict:
    from megatron_dmc.eval.lm_eval_adapter import run_tasks

    names = [t for t in s.tasks if t in ALL_TASKS]
    subset = s.mmlu_per_subject is not None and "mmlu" in names
    plain = [t for t in names if not (subset and t == "mmlu")]
    out = run_tasks(model, tokenizer, method, tuple(plain), s.limit) if plain else {}
    if subset:
        from megatron_dmc.eval.mmlu_subset import mmlu_subset

        samples = mmlu_subset(s.mmlu_per_subject)
        out |= run_tasks(model, tokenizer, method, ("mmlu",), samples=samples)
    return out


def generation_tasks(
    model: nn.Module, tokenizer, method: KVMethod, s: EvalSettings, progress: bool = True
) -> tuple[dict, dict]:
    """({task: {metric: value}}, {task: per-problem details}) of humaneval and needle."""
    from megatron_dmc.eval.humaneval import run_humaneval
    from megatron_dmc.eval.needle import run_needle

    scores, details = {}, {}
    if "humaneval" in s.tasks:
        out = run_humaneval(model, tokenizer, method, s.humaneval, progress=progress)
        scores["humaneval"] = {"pass@1": out["pass@1"], "acc": out["pass@1"]}
        details["humaneval"] = out
    if "needle" in s.tasks:
        out = run_needle(model, tokenizer, method, s.needle, progress=progress)
        scores["needle"] = {"acc": out["acc"]} | {
            f"acc_{t}": v for t, v in out["acc_by_task"].items()
        }
        details["needle"] = out
    return scores, details


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
    tasks = _lm_eval_tasks(model, tokenizer, method, s)
    scores, details = generation_tasks(model, tokenizer, method, s, progress)
    row = make_row(method.name, method.compression_ratio, results, tasks | scores, dense_kv_bytes)
    row.task_details = details
    return row


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
