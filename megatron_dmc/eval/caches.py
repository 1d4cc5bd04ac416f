"""One code path for every KV method: run a causal LM through a cache and measure it.

A KV method makes the cache a model is run with. `NativeCache` leaves the choice to the
model: transformers' dense `DynamicCache` for a plain Llama, the compressed `DMCCache` for a
DMC Llama. The eviction baselines (H2O, TOVA) live in `eviction.py`.

Shapes: B batch, T tokens of one call, V vocabulary.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers import Cache


class KVMethod(Protocol):
    """How the key/value cache of a model is built (and so what it keeps)."""

    name: str
    compression_ratio: float

    def make_cache(self, model: nn.Module, context_len: int | None) -> Cache | None:
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


def _cache_kwarg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_cached(
    model: nn.Module, ids_BT: torch.Tensor, cache: Cache | None
) -> tuple[torch.Tensor, Cache]:
    """One forward call that appends `ids_BT` to `cache` (created by the model when None).

    Returns fp32 log-probabilities [B, T, V] and the cache to pass to the next call.
    """
    kwargs = {_cache_kwarg(model): cache, "use_cache": True}
    out = model(input_ids=ids_BT, **kwargs)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    assert new_cache is not None, "the model returned no cache although use_cache=True"
    return torch.log_softmax(out.logits.float(), dim=-1), new_cache


def kv_bytes(cache: Cache) -> int:
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


def peak_kv_bytes(cache: Cache) -> int:
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
