"""(d) The same workload through HF transformers `generate` with its dense cache."""

from __future__ import annotations

import torch

from megatron_dmc.bench.presets import Preset
from megatron_dmc.bench.timing import timed
from megatron_dmc.bench.workloads import default_dtype
from megatron_dmc.inference.model import LlamaForInference
from megatron_dmc.schema.llama import hf_config_from_shape


def hf_model(model: LlamaForInference, preset: Preset):
    """transformers.LlamaForCausalLM holding the same weights (vanilla Llama attention)."""
    import transformers

    config = transformers.LlamaConfig(**hf_config_from_shape(preset.shape))
    with torch.device(preset.device), default_dtype(preset.dtype):
        hf = transformers.LlamaForCausalLM(config)
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.generation_config.pad_token_id = 0
    hf.generation_config.eos_token_id = None
    return hf.to(preset.dtype).eval()


def hf_decode_step_ms(hf, preset: Preset, batch: int, context: int) -> float:
    """Per-step decode time: (generate N+1 tokens - generate 1 token) / N, greedy, dense cache."""
    tokens_BT = torch.randint(0, preset.shape.vocab_size, (batch, context), device=preset.device)

    def run(new_tokens: int):
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return lambda: hf.generate(tokens_BT, attention_mask=torch.ones_like(tokens_BT), **kwargs)

    with torch.inference_mode():
        run(preset.warmup + 1)()
        _, prefill_only = timed(run(1), preset.device)
        _, full = timed(run(preset.steps + 1), preset.device)
    return 1e3 * (full - prefill_only) / preset.steps
