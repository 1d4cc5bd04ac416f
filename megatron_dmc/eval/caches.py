"""One code path for every KV method: run a causal LM through a cache and measure it.

A KV method makes the cache a model is run with. `PagedEngine` runs the model's weights
through megatron_dmc.inference (the paged per-head cache, parallel chunked prefill, decode
backends): compressed for a DMC Llama, dense for a plain one, so that quality and speed
come from the same code. `NativeCache` leaves the choice to transformers (`DynamicCache`,
or the DMC Llama's own `DMCCache`). The eviction baselines (H2O, TOVA) live in
`eviction.py`.

Shapes: B batch, T tokens of one call, V vocabulary, L layers, G KV heads.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import nn
from transformers import Cache

from megatron_dmc.inference.kv_cache import PagedKVCache
from megatron_dmc.inference.loading import from_transformers
from megatron_dmc.inference.model import LlamaForInference
from megatron_dmc.inference.stats import cache_stats


class KVMethod(Protocol):
    """How the key/value cache of a model is built (and so what it keeps)."""

    name: str
    compression_ratio: float

    def make_cache(self, model: nn.Module, context_len: int | None) -> Cache | EngineCache | None:
        """A fresh cache for `context_len` tokens; None lets the model build its own.

        A budgeted method sizes its budget for `context_len` tokens; `context_len=None` asks
        for a budget that follows the tokens seen (ceil(seen / CR) after every call)."""
        ...


@dataclass
class NativeCache:
    """The model's own cache: dense for Llama, compressed for DMC (its CR is the model's)."""

    name: str = "vanilla"
    compression_ratio: float = 1.0

    def make_cache(self, model: nn.Module, context_len: int | None) -> Cache | None:
        return None


class EngineCache:
    """One sequence in a paged engine cache; `forward_cached` extends it chunk by chunk."""

    def __init__(self, engine: LlamaForInference, cache: PagedKVCache, backend: str) -> None:
        self.engine, self.cache, self.backend = engine, cache, backend
        self.seq_ids_B = cache.add_sequences(1)

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """Logits [1, T, V] of the chunk; the cache then holds it."""
        if ids_BT.shape[0] != 1:
            raise ValueError(
                f"an engine cache holds one sequence; got a batch of {ids_BT.shape[0]}"
            )
        return self.engine.extend(ids_BT, self.cache, self.seq_ids_B, self.backend)

    def slot_counts(self) -> torch.Tensor:
        """Kept slots per (layer, sequence, KV head), [L, 1, G]."""
        return self.cache.slot_counts(self.seq_ids_B)

    def compression_ratio(self) -> float:
        """Tokens seen / slots kept over all layers and KV heads (the exact window counts)."""
        seen = int(self.cache.seen_LB[:, self.seq_ids_B].sum()) * self.cache.config.num_kv_heads
        return seen / max(int(self.slot_counts().sum()), 1)

    def kv_bytes(self) -> int:
        """Allocated pages plus the DMC window rings (0 in dense mode)."""
        stats = cache_stats(self.cache)
        return stats.allocated_bytes + stats.window_state_bytes

    @property
    def peak_bytes(self) -> int:
        stats = cache_stats(self.cache)
        return stats.peak_allocated_bytes + stats.window_state_bytes

    def __deepcopy__(self, memo: dict) -> EngineCache:
        twin = copy.copy(self)
        twin.cache = copy.deepcopy(self.cache, memo)
        return twin


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_for(model: nn.Module, mode: str = "auto") -> LlamaForInference:
    """The paged engine over `model`'s weights (built once per model and mode, shared)."""
    engines = _ENGINES.setdefault(model, {})
    if mode not in engines:
        engines[mode] = from_transformers(model, mode)
    return engines[mode]


def set_decision_threshold(model: nn.Module, threshold: float) -> None:
    """Give a DMC model (its config and every engine built over it) a new decision
    threshold (`DMCConfig.decision_threshold`)."""
    model.config.dmc_decision_threshold = float(threshold)
    for engine in _ENGINES.get(model, {}).values():
        if engine.dmc is not None:
            engine.dmc = replace(engine.dmc, decision_threshold=float(threshold))


@dataclass
class PagedEngine:
    """The model through megatron_dmc.inference: compressed for DMC, dense for plain Llama.

    Chunks of more than one token run the parallel prefill (continuing the cache); single
    tokens run a decode step with `backend`. Bytes are the allocated pages (+ DMC rings).
    """

    name: str = "dmc"
    compression_ratio: float = 1.0
    page_size: int = 16
    backend: str = "padded"

    def make_cache(self, model: nn.Module, context_len: int | None) -> EngineCache:
        engine = engine_for(model, "dmc" if self.name == "dmc" else "auto")
        shape = engine.shape
        per_stream = -(-(context_len or self.page_size) // self.page_size)
        pages = shape.num_hidden_layers * shape.num_key_value_heads * per_stream
        config = engine.cache_config(
            pages,
            1,
            shape.max_position_embeddings,
            page_size=self.page_size,
            growable=True,
        )
        return EngineCache(engine, PagedKVCache(config), self.backend)


def _cache_kwarg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_cached(
    model: nn.Module, ids_BT: torch.Tensor, cache: Cache | EngineCache | None
) -> tuple[torch.Tensor, Cache | EngineCache]:
    """One forward call that appends `ids_BT` to `cache` (created by the model when None).

    Returns fp32 log-probabilities [B, T, V] and the cache to pass to the next call.
    """
    if isinstance(cache, EngineCache):
        return torch.log_softmax(cache.forward(ids_BT).float(), dim=-1), cache
    kwargs = {_cache_kwarg(model): cache, "use_cache": True}
    out = model(input_ids=ids_BT, **kwargs)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    assert new_cache is not None, "the model returned no cache although use_cache=True"
    return torch.log_softmax(out.logits.float(), dim=-1), new_cache


def kv_bytes(cache: Cache | EngineCache) -> int:
    """Bytes of key/value state the cache holds now (a DMC cache counts its pages)."""
    for method in ("allocated_bytes", "kv_bytes"):
        if hasattr(cache, method):
            return int(getattr(cache, method)())
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def peak_kv_bytes(cache: Cache | EngineCache) -> int:
    """The most bytes the cache held at any moment, where it tracks that; else `kv_bytes`."""
    if hasattr(cache, "peak_bytes"):
        return int(cache.peak_bytes)
    return kv_bytes(cache)


def dense_kv_bytes(model: nn.Module, tokens: int, batch: int = 1) -> int:
    """What a dense K/V cache of `tokens` tokens holds for this model, in its parameter dtype."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element
    return batch * tokens * per_token
