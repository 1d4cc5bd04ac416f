"""Decode engines measured side by side: ours (paged cache) and transformers' dense cache.

Legend: B sequences, T time, V vocabulary.

Every engine holds a batch whose cache already covers `context` tokens (one prefilled
prompt copied to every row) and exposes one greedy decode step and its KV bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_dmc.bench.workloads import FilledDecode
from megatron_dmc.inference import cache_stats


@dataclass
class Engine:
    """One row of the comparison: a label, what to step, and the measured step times."""

    label: str
    batch: int
    step: object
    kv_bytes: object
    seconds: list[float] = field(default_factory=list)

    @property
    def step_ms(self) -> float:
        return 1e3 * sum(self.seconds) / len(self.seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.batch * len(self.seconds) / sum(self.seconds)


def ours(label: str, run: FilledDecode, backend: str) -> Engine:
    """Our engine; KV bytes = allocated pages plus DMC window rings."""

    def kv_bytes() -> int:
        stats = cache_stats(run.cache)
        return stats.allocated_bytes + stats.window_state_bytes

    return Engine(label, int(run.seq_ids_B.numel()), lambda: run.step(backend), kv_bytes)


@dataclass
class DenseDecode:
    """transformers `LlamaForCausalLM` with its DynamicCache (what `generate` steps)."""

    model: object
    cache: object
    next_B: torch.Tensor

    def step(self) -> None:
        with torch.inference_mode():
            out = self.model(self.next_B[:, None], cache=self.cache, use_cache=True)
        self.next_B = out.logits[:, -1].argmax(-1)

    def kv_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for layer in self.cache.layers
            for t in (layer.keys, layer.values)
        )


def transformers_dense(hf_model, prompt_1T: torch.Tensor, batch: int) -> Engine:
    """Prefill one prompt through transformers, repeat its cache to `batch` rows."""
    from transformers import DynamicCache

    cache = DynamicCache(config=hf_model.config)
    with torch.inference_mode():
        out = hf_model(prompt_1T, cache=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(batch)
    run = DenseDecode(hf_model, cache, out.logits[:, -1].argmax(-1).expand(batch).clone())
    return Engine("transformers dense", batch, run.step, run.kv_bytes)


def load_transformers(model_dir: str, dtype: torch.dtype = torch.float32):
    """transformers.LlamaForCausalLM from an HF directory (SDPA attention), eval mode."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def time_round_robin(engines: list[Engine], steps: int, clock) -> None:
    """One untimed step each, then `steps` rounds of one timed step per engine."""
    for engine in engines:
        engine.step()
    for round_index in range(steps):
        order = engines if round_index % 2 == 0 else engines[::-1]
        for engine in order:
            start = clock()
            engine.step()
            engine.seconds.append(clock() - start)
