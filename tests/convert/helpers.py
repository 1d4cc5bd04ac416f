"""Tiny random HF Llama directories (never downloaded) for the converter tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=50000.0,
    tie_word_embeddings=False,
)


def tiny_config(**overrides: Any) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **overrides})


def write_tiny_llama(
    out_dir: Path, seed: int = 0, max_shard_size: str | None = None, **overrides: Any
) -> Path:
    """A random tiny LlamaForCausalLM saved with save_pretrained (+ a fake tokenizer file)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return out_dir


def edit_config(hf_dir: Path, **changes: Any) -> None:
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
