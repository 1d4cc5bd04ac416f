"""Training-free KV eviction baselines with a real budget: H2O and TOVA.

After every forward call each layer's cache holds at most `budget` slots per (sequence,
KV head); the evicted keys and values are dropped, not masked. Within one call a layer
briefly holds `budget + T` slots (the call's own tokens), one layer at a time. The budget
is fixed (sized for a known number of tokens) or follows the tokens seen: ceil(seen / CR)
after every call, the matched protocol's rule (matched.py).

The attention weights that drive eviction come from a forward hook on each attention
module, so the model must run eager attention (`prepare_for_eviction` switches it).

Shapes: B batch, N query heads, H KV heads, T tokens of one call, S held slots,
K kept slots, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Cache
from transformers.cache_utils import DynamicLayer


def kv_budget(context_len: int, compression_ratio: float) -> int:
    """Slots per (layer, sequence, KV head) that compress `context_len` tokens by the ratio."""
    return max(1, math.ceil(context_len / compression_ratio))


@dataclass
class EvictionPolicy:
    """Base of the eviction rules: a subclass says how a slot's score is updated."""

    compression_ratio: float = 2.0
    """Budget = ceil(context length / compression_ratio) slots per layer and KV head."""

    recent_fraction: float = 0.0
    """Share of the budget always kept for the newest tokens, whatever their score."""

    def __post_init__(self) -> None:
        if self.compression_ratio < 1:
            raise ValueError(f"compression_ratio must be >= 1; got {self.compression_ratio}")
        if not 0 <= self.recent_fraction < 1:
            raise ValueError(f"recent_fraction must be in [0, 1); got {self.recent_fraction}")

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def score(self, score_BHS: torch.Tensor, attn_BHTS: torch.Tensor) -> torch.Tensor:
        """New score of every held slot from its old one and this call's attention."""
        raise NotImplementedError

    def make_cache(self, model: nn.Module, context_len: int | None) -> Cache:
        """A cache of ceil(context_len / CR) slots; None: ceil(tokens seen / CR) after every call."""
        prepare_for_eviction(model)
        budget = None if context_len is None else kv_budget(context_len, self.compression_ratio)
        return EvictionCache(self, budget, model.config.num_hidden_layers)


@dataclass
class H2O(EvictionPolicy):
    """Heavy hitters (Zhang et al., 2023): a slot's score is the attention it has received
    from every query so far, averaged over the query heads of its KV group; half of the
    budget is kept for the most recent tokens."""

    recent_fraction: float = 0.5

    def score(self, score_BHS: torch.Tensor, attn_BHTS: torch.Tensor) -> torch.Tensor:
        return score_BHS + attn_BHTS.sum(dim=2)


@dataclass
class TOVA(EvictionPolicy):
    """Token omission via attention (Oren et al., 2024): keep the slots the newest query
    attends to most. `per_layer=True` averages the weights over all query heads of the
    layer (one choice shared by its KV heads, as in the paper); False averages over the
    query heads of each KV group (one choice per KV head)."""

    per_layer: bool = True

    def score(self, score_BHS: torch.Tensor, attn_BHTS: torch.Tensor) -> torch.Tensor:
        newest_BHS = attn_BHTS[:, :, -1]
        if self.per_layer:
            return newest_BHS.mean(dim=1, keepdim=True).expand_as(newest_BHS)
        return newest_BHS


class EvictionLayer(DynamicLayer):
    """One layer's cache: held keys/values with their positions and scores."""

    def __init__(self, policy: EvictionPolicy, budget: int | None) -> None:
        super().__init__()
        self.policy, self.fixed_budget, self.seen, self.attended = policy, budget, 0, 0
        self.score_BHS: torch.Tensor | None = None
        self.position_BHS: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            b, h = key_states.shape[:2]
            self.score_BHS = key_states.new_zeros(b, h, 0, dtype=torch.float32)
            self.position_BHS = torch.zeros(b, h, 0, dtype=torch.long, device=key_states.device)
        b, h, t = key_states.shape[:3]
        new_BHT = torch.arange(self.seen, self.seen + t, device=key_states.device)
        self.position_BHS = torch.cat([self.position_BHS, new_BHT.expand(b, h, t)], dim=-1)
        self.score_BHS = torch.cat([self.score_BHS, self.score_BHS.new_zeros(b, h, t)], dim=-1)
        self.seen += t
        return super().update(key_states, value_states)

    @property
    def budget(self) -> int:
        """Slots kept after a call: the fixed budget, else ceil(tokens seen / CR)."""
        if self.fixed_budget is not None:
            return self.fixed_budget
        return kv_budget(self.seen, self.policy.compression_ratio)

    def held(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.held()
        return held + query_length, self.seen - held

    def get_seq_length(self) -> int:
        return self.seen

    def observe(self, attn_BNTS: torch.Tensor) -> None:
        """Score the held slots with this call's attention, then evict down to the budget."""
        b, n, t, s = attn_BNTS.shape
        h, self.attended = self.keys.shape[1], s
        attn_BHTS = attn_BNTS.float().view(b, h, n // h, t, s).mean(dim=2)
        self.score_BHS = self.policy.score(self.score_BHS, attn_BHTS)
        if s > self.budget:
            self._evict(self.budget)

    def _evict(self, budget: int) -> None:
        recent = int(self.policy.recent_fraction * budget)
        protected_BHS = self.position_BHS >= self.seen - recent
        priority_BHS = self.score_BHS.masked_fill(protected_BHS, float("inf"))
        keep_BHK = priority_BHS.topk(budget, dim=-1).indices.sort(dim=-1).values
        keep_BHKD = keep_BHK[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, keep_BHKD).contiguous()
        self.values = self.values.gather(2, keep_BHKD).contiguous()
        self.score_BHS = self.score_BHS.gather(2, keep_BHK)
        self.position_BHS = self.position_BHS.gather(2, keep_BHK)


class EvictionCache(Cache):
    """A cache whose layers keep at most `budget` slots per (sequence, KV head) after every
    call; `budget=None`: ceil(tokens seen / CR)."""

    def __init__(self, policy: EvictionPolicy, budget: int | None, num_layers: int) -> None:
        super().__init__(layers=[EvictionLayer(policy, budget) for _ in range(num_layers)])
        self.policy, self.budget, self.peak_bytes = policy, budget, 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.peak_bytes = max(self.peak_bytes, self.kv_bytes())
        return out

    def observe(self, layer_idx: int, attn_BNTS: torch.Tensor) -> None:
        self.layers[layer_idx].observe(attn_BNTS)

    def kv_bytes(self) -> int:
        """Bytes of keys and values held now (scores and positions not counted)."""
        held = [layer for layer in self.layers if layer.is_initialized]
        return sum(
            x.numel() * x.element_size() for layer in held for x in (layer.keys, layer.values)
        )

    def held_slots(self) -> int:
        """The most slots any layer holds per (sequence, KV head)."""
        return max(layer.held() for layer in self.layers)

    def slot_counts(self) -> torch.Tensor:
        """Slots held per (layer, sequence, KV head), [L, B, H] (as `DMCCache.slot_counts`)."""
        return self._per_head([layer.held() for layer in self.layers])

    def attended_slots(self) -> torch.Tensor:
        """Slots the last call's queries saw per (layer, sequence, KV head), [L, B, H]: the
        held ones plus the call's own tokens, before that call's eviction."""
        return self._per_head([layer.attended for layer in self.layers])

    def _per_head(self, counts: list[int]) -> torch.Tensor:
        b, h = self.layers[0].keys.shape[:2]
        return torch.tensor(counts)[:, None, None].expand(-1, b, h)


def _after_attention(module: nn.Module, args, kwargs, output) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, EvictionCache):
        return
    attn_BNTS = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if attn_BNTS is None:
        raise ValueError(
            "H2O/TOVA need the attention weights; run the model with eager attention "
            "(model.set_attn_implementation('eager'))"
        )
    cache.observe(module.layer_idx, attn_BNTS)


def prepare_for_eviction(model: nn.Module) -> None:
    """Switch to eager attention and hook every attention module (idempotent)."""
    if getattr(model, "_eviction_hooked", False):
        return
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        model.set_attn_implementation("eager")
    attention = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    if not attention or not all(hasattr(m, "layer_idx") for m in attention):
        raise ValueError(
            f"{type(model).__name__} has no Llama-style attention modules with a layer_idx; "
            "H2O/TOVA support transformers Llama-family models"
        )
    for module in attention:
        module.register_forward_hook(_after_attention, with_kwargs=True)
    model._eviction_hooked = True
