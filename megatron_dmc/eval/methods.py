"""Names of the compared methods, and loading a model to evaluate with one.

- vanilla: the original model, dense cache.
- dmc: a DMC Llama export (its compressed cache; CR is what it learned).
- gqa: a mean-pooled, uptrained GQA model (dense cache of fewer KV heads).
- h2o, tova: the original model with a training-free eviction cache at the given CR.

vanilla, dmc and gqa run through the paged inference engine (`PagedEngine`): the same
prefill, decode and cache code whose speed and memory the benchmarks report, dense for
vanilla and GQA, compressed for DMC, so DMC's cost and quality are compared with vanilla's
on one engine. h2o and tova evict from transformers' dense cache (`eviction.py`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from megatron_dmc.eval.caches import KVMethod, PagedEngine
from megatron_dmc.eval.eviction import H2O, TOVA

METHODS = ("vanilla", "dmc", "gqa", "h2o", "tova")


def build_method(name: str, compression_ratio: float = 1.0) -> KVMethod:
    """The KV method called `name`; the ratio sets the budget of h2o/tova, labels the rest."""
    if name == "h2o":
        return H2O(compression_ratio=compression_ratio)
    if name == "tova":
        return TOVA(compression_ratio=compression_ratio)
    if name in METHODS:
        return PagedEngine(name=name, compression_ratio=compression_ratio)
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")


def offline() -> None:
    """Never reach a hub: evaluation reads local files only."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An HF causal LM (plain or DMC Llama) from a local directory, in eval mode."""
    offline()
    from transformers import AutoModelForCausalLM

    import megatron_dmc.hf  # noqa: F401  (registers the DMC Llama with the Auto classes)

    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{path} is not an HF model directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def load_tokenizer(path: str | Path):
    """The tokenizer saved with the model at `path`."""
    offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
