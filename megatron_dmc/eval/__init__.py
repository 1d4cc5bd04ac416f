"""Evaluation: perplexity protocols (today's and matched), eviction baselines (H2O, TOVA), GQA conversion,
an lm-evaluation-harness adapter with local tasks, and the results table."""

from megatron_dmc.eval.caches import KVMethod, NativeCache, dense_kv_bytes, kv_bytes
from megatron_dmc.eval.eviction import H2O, TOVA, EvictionCache, EvictionPolicy, kv_budget
from megatron_dmc.eval.matched import matched_continuation_perplexity, matched_strided_perplexity
from megatron_dmc.eval.perplexity import (
    PerplexityResult,
    continuation_perplexity,
    strided_perplexity,
)

__all__ = [
    "H2O",
    "TOVA",
    "EvictionCache",
    "EvictionPolicy",
    "KVMethod",
    "NativeCache",
    "PerplexityResult",
    "continuation_perplexity",
    "dense_kv_bytes",
    "kv_budget",
    "kv_bytes",
    "matched_continuation_perplexity",
    "matched_strided_perplexity",
    "strided_perplexity",
]
