"""Benchmark presets: model shape and workload sizes for the CPU quick/full and GPU runs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_dmc.schema.llama import LlamaShape

CPU_SHAPE = LlamaShape(
    vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=8192,
)  # fmt: skip
"""Small MHA Llama: at 512+ tokens of context the decode step is dominated by attention."""

LLAMA2_7B_SHAPE = LlamaShape(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=8192,
    dtype="bfloat16",
)  # fmt: skip


@dataclass(frozen=True)
class Preset:
    name: str
    shape: LlamaShape
    dtype: torch.dtype
    device: str
    crs: tuple[float, ...] = (2.0, 4.0, 8.0)
    contexts: tuple[int, ...] = (512, 1024, 2048, 4096)
    batch: int = 4
    """Batch of the equal-batch runs (a) and of the HF comparison (d)."""
    memory_batch: int = 4
    """Vanilla batch that sets the KV budget of the equal-memory runs (b)."""
    steps: int = 16
    warmup: int = 3
    memory_context: int = 2048
    prefill_tokens: int = 2048
    hf_contexts: tuple[int, ...] = (512, 2048)
    page_size: int = 16
    prefill_chunk: int | None = None
    prefill_modes: tuple[float | None, ...] = ()
    """CRs (None = vanilla) of the prefill comparison (c); empty: vanilla and the largest CR."""
    notes: list[str] = field(default_factory=list)


PRESETS = {
    "quick": Preset("cpu-quick", CPU_SHAPE, torch.float32, "cpu", contexts=(512, 2048), steps=8,
                    warmup=2, memory_context=1024, memory_batch=2, prefill_tokens=2048,
                    hf_contexts=(1024,),
                    prefill_modes=(8.0,), prefill_chunk=512),
    "cpu": Preset("cpu-full", CPU_SHAPE, torch.float32, "cpu", prefill_chunk=512),
    "gpu": Preset("gpu-llama2-7b-shape", LLAMA2_7B_SHAPE, torch.bfloat16, "cuda", batch=8,
                  contexts=(512, 1024, 2048, 4096), memory_context=4096, prefill_tokens=2048,
                  hf_contexts=(2048,), steps=32, warmup=4, prefill_chunk=1024),
}  # fmt: skip
