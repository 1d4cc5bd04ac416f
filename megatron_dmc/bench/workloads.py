"""The measured workloads: decode at a given batch / context / pool, and prefill.

Legend: B sequences, T time, V vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from megatron_dmc.bench.presets import Preset
from megatron_dmc.bench.timing import timed
from megatron_dmc.inference import PagedKVCache, cache_stats
from megatron_dmc.inference.decisions import ForcedRate
from megatron_dmc.inference.generation import default_num_pages
from megatron_dmc.inference.model import LlamaForInference
from megatron_dmc.ops import DMCConfig, dms_config


def random_model(preset: Preset, seed: int = 0) -> LlamaForInference:
    """Random weights (std 0.02, norms 1) in the preset's dtype and device; vanilla mode."""
    torch.manual_seed(seed)
    with torch.device(preset.device), default_dtype(preset.dtype):
        model = LlamaForInference(preset.shape, None)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model.to(preset.dtype).eval()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build parameters directly in `dtype` (a 7B model never exists in float32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


MODEL_DECISIONS = "model"
"""Mode of a loaded DMC checkpoint deciding for itself (instead of a forced CR)."""

Mode = float | str | None


def with_mode(model: LlamaForInference, mode: Mode) -> LlamaForInference:
    """The same weights in vanilla mode (None), DMC with FORCED-RATE decisions at CR `mode`,
    or DMC with the checkpoint's own decisions (MODEL_DECISIONS)."""
    trained = getattr(model, "trained_dmc", None)
    view = copy.copy(model)
    view.dmc = None if mode is None else trained or DMCConfig()
    view.forced = ForcedRate(mode) if isinstance(mode, float | int) else None
    if mode == MODEL_DECISIONS and trained is None:
        raise ValueError("the model's own decisions need a DMC checkpoint (--model-dir export)")
    return view


def with_delay(model: LlamaForInference, cr: float, delay: int) -> LlamaForInference:
    """The same weights as DMC (channel decisions) with a merge delay of `delay` exact tokens,
    decisions FORCED to CR `cr` as tokens leave the exact ring."""
    view = copy.copy(model)
    view.dmc = DMCConfig(merge_delay=delay)
    view.forced = ForcedRate(cr)
    return view


def as_dms(model: LlamaForInference, cr: float, window: int) -> LlamaForInference:
    """The same weights (shared, not copied) as DMS with a sliding window of `window` tokens
    and zero-initialised decision heads; evictions FORCED to CR `cr` (ops.dms)."""
    dms = dms_config(window)
    with torch.device("meta"):
        view = LlamaForInference(model.shape, dms, ForcedRate(cr))
    state = dict(model.state_dict())
    for name, param in view.state_dict().items():
        if name.endswith("dmc_decision_proj.weight"):
            state[name] = torch.zeros(param.shape, dtype=model.lm_head.weight.dtype)
    view.load_state_dict(state, assign=True)
    if model.shape.tie_word_embeddings:
        view.lm_head.weight = view.model.embed_tokens.weight
    return view.eval()


@dataclass
class DecodeRun:
    mode: str
    batch: int
    context: int
    prefill_s: float
    step_ms: float
    tokens_per_s: float
    kv_allocated_bytes: int
    kv_peak_bytes: int
    """Peak KV pages plus the prefill's one-layer dense working set."""
    window_state_bytes: int
    pool_bytes: int
    compression_ratio: float
    fragmentation: float

    def as_dict(self) -> dict:
        return asdict(self)


def mode_name(mode: Mode) -> str:
    if mode is None:
        return "vanilla"
    return "dmc-model-decisions" if mode == MODEL_DECISIONS else f"dmc-forced-cr{mode:g}"


def run_decode(
    model: LlamaForInference,
    preset: Preset,
    cr: Mode,
    batch: int,
    context: int,
    num_pages: int | None = None,
    backend: str = "paged",
) -> DecodeRun:
    """Prefill `batch` random prompts of `context` tokens, then time greedy decode steps."""
    model = with_mode(model, cr)
    total = context + preset.warmup + preset.steps + 1
    pages = num_pages or default_num_pages(model, batch, total, preset.page_size)
    cache = PagedKVCache(model.cache_config(pages, batch, total, page_size=preset.page_size))
    seq_B = cache.add_sequences(batch)
    gen = torch.Generator(device=preset.device).manual_seed(1)
    tokens_BT = torch.randint(
        0, preset.shape.vocab_size, (batch, context), generator=gen, device=preset.device
    )
    lengths_B = torch.full((batch,), context, device=preset.device)
    logits_BV, prefill_s = timed(
        lambda: model.prefill(tokens_BT, lengths_B, cache, seq_B, preset.prefill_chunk),
        preset.device,
    )
    transient = model.last_prefill_transient_bytes
    next_B = logits_BV.argmax(-1)
    for _ in range(preset.warmup):
        next_B = model.decode(next_B, cache, seq_B, backend).argmax(-1)

    def steps():
        nonlocal next_B
        for _ in range(preset.steps):
            next_B = model.decode(next_B, cache, seq_B, backend).argmax(-1)

    _, seconds = timed(steps, preset.device)
    stats = cache_stats(cache)
    return DecodeRun(
        mode=mode_name(cr), batch=batch, context=context, prefill_s=prefill_s,
        step_ms=1e3 * seconds / preset.steps, tokens_per_s=batch * preset.steps / seconds,
        kv_allocated_bytes=stats.allocated_bytes, kv_peak_bytes=stats.peak_allocated_bytes + transient,
        window_state_bytes=stats.window_state_bytes, pool_bytes=stats.pool_bytes,
        compression_ratio=stats.compression_ratio, fragmentation=stats.fragmentation,
    )  # fmt: skip


def token_by_token_prefill_s(
    model: LlamaForInference, preset: Preset, cr: Mode, length: int
) -> float:
    """Seconds to fill the cache one token at a time (the release's prefill), batch 1."""
    model = with_mode(model, cr)
    pages = default_num_pages(model, 1, length, preset.page_size)
    cache = PagedKVCache(model.cache_config(pages, 1, length, page_size=preset.page_size))
    seq_B = cache.add_sequences(1)
    tokens_T = torch.randint(0, preset.shape.vocab_size, (length,), device=preset.device)
    model.prefill(
        tokens_T[None, :1], torch.ones(1, dtype=torch.long, device=preset.device), cache, seq_B
    )

    def loop():
        for t in range(1, length):
            model.decode(tokens_T[t : t + 1], cache, seq_B)

    return timed(loop, preset.device)[1]


def parallel_prefill_s(model: LlamaForInference, preset: Preset, cr: Mode, length: int) -> float:
    model = with_mode(model, cr)
    pages = default_num_pages(model, 1, length, preset.page_size)
    cache = PagedKVCache(model.cache_config(pages, 1, length, page_size=preset.page_size))
    seq_B = cache.add_sequences(1)
    tokens_BT = torch.randint(0, preset.shape.vocab_size, (1, length), device=preset.device)
    lengths_B = torch.full((1,), length, device=preset.device)
    return timed(
        lambda: model.prefill(tokens_BT, lengths_B, cache, seq_B, preset.prefill_chunk),
        preset.device,
    )[1]


def smollm2_model(dtype: torch.dtype = torch.float32) -> LlamaForInference:
    """SmolLM2-135M with its real weights from the asset cache, vanilla mode."""
    from megatron_dmc.assets.smollm2 import smollm2_hf_dir
    from megatron_dmc.inference.loading import load_model

    return load_model(smollm2_hf_dir(verbose=False), mode="vanilla", dtype=dtype)


@dataclass
class FilledDecode:
    """A batch whose cache holds `context` tokens per sequence, ready for greedy steps."""

    model: LlamaForInference
    cache: PagedKVCache
    seq_ids_B: torch.Tensor
    next_B: torch.Tensor

    def step(self, backend: str = "paged") -> None:
        self.next_B = self.model.decode(self.next_B, self.cache, self.seq_ids_B, backend).argmax(-1)


def filled_decode(
    model: LlamaForInference,
    batch: int,
    context: int,
    steps: int,
    num_pages: int | None = None,
    page_size: int = 16,
    chunk: int = 512,
    prompt_B: torch.Tensor | None = None,
) -> FilledDecode:
    """Prefill one prompt of `context` tokens (random, or `prompt_B`'s first row), copy its
    cache to all `batch` rows, leaving room for `steps` decode steps."""
    from megatron_dmc.bench.fill import replicate_first

    total = context + steps + 1
    pages = num_pages or default_num_pages(model, batch, total, page_size)
    cache = PagedKVCache(model.cache_config(pages, batch, total, page_size=page_size))
    seq_B = cache.add_sequences(batch)
    if prompt_B is None:
        gen = torch.Generator().manual_seed(1)
        prompt_B = torch.randint(0, model.shape.vocab_size, (1, context), generator=gen)
    logits_BV = model.prefill(prompt_B[:1], torch.tensor([context]), cache, seq_B[:1], chunk)
    replicate_first(cache, seq_B)
    return FilledDecode(model, cache, seq_B, logits_BV.argmax(-1).expand(batch).clone())
