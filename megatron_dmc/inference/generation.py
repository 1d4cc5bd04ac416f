"""Batched generation from ragged prompts through the paged compressed cache.

Legend: B sequences, T time, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_dmc.inference.kv_cache import PagedKVCache
from megatron_dmc.inference.model import LlamaForInference
from megatron_dmc.inference.pool import CacheFullError
from megatron_dmc.inference.sampling import SamplingConfig, next_tokens
from megatron_dmc.inference.stats import CacheStats, cache_stats


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    """New tokens of each prompt (EOS included when it stopped the sequence)."""

    finish_reasons: list[str]
    """'eos', 'length', or 'cache_full' (preempted: the page pool ran out)."""

    tokens_seen: int = 0
    slots_kept: int = 0
    peak_cache_bytes: int = 0
    """High-water mark of allocated KV pages (all layers), in bytes."""

    prefill_transient_bytes: int = 0
    """Dense K/V working set of one layer's prefill chunk, held on top of the pages."""

    stats_after_prefill: CacheStats | None = None
    per_sequence_cr: list[float] = field(default_factory=list)

    @property
    def compression_ratio(self) -> float:
        """Tokens seen / slots kept over all layers, heads and sequences."""
        return self.tokens_seen / self.slots_kept if self.slots_kept else 1.0


def default_num_pages(
    model: LlamaForInference, batch: int, max_seq_len: int, page_size: int
) -> int:
    """Pages for every stream at full length: enough for vanilla, never exhausted."""
    per_stream = -(-max_seq_len // page_size)
    return model.shape.num_hidden_layers * batch * model.shape.num_key_value_heads * per_stream


def generate(
    model: LlamaForInference,
    prompts: list[list[int]],
    sampling: SamplingConfig | None = None,
    page_size: int = 16,
    num_pages: int | None = None,
    chunk_size: int | None = None,
    backend: str = "paged",
) -> GenerationResult:
    """Prefill all prompts in parallel, then decode until EOS or max_new_tokens.

    When the pool cannot take the next step, the sequence holding the most pages is
    stopped ('cache_full') and its pages freed; the others go on.
    """
    sampling = sampling or SamplingConfig()
    _check_prompts(model, prompts, sampling)
    batch = len(prompts)
    max_seq_len = max(map(len, prompts)) + sampling.max_new_tokens
    num_pages = num_pages or default_num_pages(model, batch, max_seq_len, page_size)
    cache = PagedKVCache(model.cache_config(num_pages, batch, max_seq_len, page_size=page_size))
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    seq_ids_B = cache.add_sequences(batch)
    result = GenerationResult([[] for _ in prompts], [""] * batch, per_sequence_cr=[0.0] * batch)
    tokens_BT, lengths_B = _pad(prompts, model.lm_head.weight.device)
    try:
        logits_BV = model.prefill(tokens_BT, lengths_B, cache, seq_ids_B, chunk_size)
    except CacheFullError as error:
        cache.free_sequences(seq_ids_B)
        raise CacheFullError(f"{error} (during prefill of {batch} prompts)") from error
    result.prefill_transient_bytes = model.last_prefill_transient_bytes
    result.stats_after_prefill = cache_stats(cache)
    live = list(range(batch))
    while live:
        new_B = next_tokens(logits_BV, sampling, generator).tolist()
        pending = [
            (b, t)
            for b, t in zip(live, new_B)
            if not _finished(b, t, sampling, result, cache, seq_ids_B)
        ]
        pending = _make_room(pending, cache, seq_ids_B, result)
        live = [b for b, _ in pending]
        if live:
            tokens_B = torch.tensor([t for _, t in pending], device=tokens_BT.device)
            logits_BV = model.decode(tokens_B, cache, seq_ids_B[live], backend)
    result.peak_cache_bytes = cache.pool.peak_in_use * cache.pool.page_bytes
    return result


def _finished(b, token, sampling, result, cache, seq_ids_B) -> bool:
    result.tokens[b].append(token)
    if token in sampling.eos_token_ids:
        _finish(b, "eos", result, cache, seq_ids_B)
    elif len(result.tokens[b]) >= sampling.max_new_tokens:
        _finish(b, "length", result, cache, seq_ids_B)
    return bool(result.finish_reasons[b])


def _finish(b: int, reason: str, result: GenerationResult, cache: PagedKVCache, seq_ids_B) -> None:
    seq = seq_ids_B[b : b + 1]
    seen = int(cache.seen_LB[:, seq].sum()) * cache.config.num_kv_heads
    slots = int(cache.slot_counts(seq).sum())
    result.tokens_seen += seen
    result.slots_kept += slots
    result.per_sequence_cr[b] = seen / max(slots, 1)
    result.finish_reasons[b] = reason
    cache.free_sequences(seq)


def _make_room(pending, cache: PagedKVCache, seq_ids_B, result: GenerationResult):
    """Preempt the sequences holding the most pages until the next step surely fits."""
    while pending:
        live = [b for b, _ in pending]
        try:
            cache.check_step_capacity(seq_ids_B[live])
            return pending
        except CacheFullError:
            pages = (cache.block_table_LBGM[:, seq_ids_B[live]] >= 0).sum(dim=(0, 2, 3))
            victim = live[int(pages.argmax())]
            _finish(victim, "cache_full", result, cache, seq_ids_B)
            pending = [(b, t) for b, t in pending if b != victim]
    return pending


def _check_prompts(
    model: LlamaForInference, prompts: list[list[int]], sampling: SamplingConfig
) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("give at least one prompt, each with at least one token")
    limit = model.shape.max_position_embeddings
    longest = max(map(len, prompts))
    if longest + sampling.max_new_tokens > limit:
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={sampling.max_new_tokens} exceeds "
            f"the model's max_position_embeddings={limit}; shorten the prompt or max_new_tokens"
        )
    vocab = model.shape.vocab_size
    if any(t < 0 or t >= vocab for p in prompts for t in p):
        raise ValueError(f"prompt token ids must lie in [0, {vocab})")


def _pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B, T] (pad id 0) and lengths [B]."""
    lengths_B = torch.tensor([len(p) for p in prompts], device=device)
    tokens_BT = torch.zeros(len(prompts), int(lengths_B.max()), dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        tokens_BT[b, : len(prompt)] = torch.tensor(prompt, device=device)
    return tokens_BT, lengths_B
