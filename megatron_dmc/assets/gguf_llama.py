"""A llama-architecture GGUF file -> a Hugging Face Llama directory (fp32 safetensors).

Quantised tensors are dequantised with the `gguf` package. llama.cpp's converter permutes
the rows of each q/k head into interleaved-pair RoPE order; `_unpermute` restores HF's
rotate-half order. The tokenizer comes from transformers' GGUF tokenizer converter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str:
    """The HF Llama parameter name of a GGUF tensor; ValueError for unknown tensors."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama mapping (not a llama GGUF?)")


def _unpermute(w_OI: np.ndarray, num_heads: int) -> np.ndarray:
    """Per head, rows (pair j, member t) -> (half t, index j): interleaved -> rotate-half."""
    out, inp = w_OI.shape
    half = out // num_heads // 2
    return w_OI.reshape(num_heads, half, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _field(reader, key: str, required: bool = True):
    field = reader.fields.get(key)
    if field is None and required:
        raise ValueError(f"GGUF metadata {key!r} missing")
    return None if field is None else field.contents()


def llama_config(reader):
    """A transformers LlamaConfig from the GGUF metadata."""
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is {arch!r}, only 'llama' is supported")
    names = {t.name for t in reader.tensors}

    def meta(key: str):
        return _field(reader, f"llama.{key}")

    return LlamaConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=meta("embedding_length"),
        intermediate_size=meta("feed_forward_length"),
        num_hidden_layers=meta("block_count"),
        num_attention_heads=meta("attention.head_count"),
        num_key_value_heads=meta("attention.head_count_kv"),
        max_position_embeddings=meta("context_length"),
        rms_norm_eps=float(str(np.float32(meta("attention.layer_norm_rms_epsilon")))),
        rope_parameters={"rope_type": "default", "rope_theta": float(meta("rope.freq_base"))},
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", required=False),
        dtype="float32",
    )


def llama_state_dict(reader, config) -> dict[str, torch.Tensor]:
    """Dequantised fp32 HF tensors, q/k rows back in rotate-half order."""
    from gguf.quants import dequantize

    heads = {
        "self_attn.q_proj.weight": config.num_attention_heads,
        "self_attn.k_proj.weight": config.num_key_value_heads,
    }
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        w = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        num_heads = heads.get(name.split(".", 3)[-1])
        if num_heads is not None:
            w = _unpermute(w, num_heads)
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32))
    return state


def convert_gguf_to_hf(gguf_file: str | Path, out_dir: str | Path) -> None:
    """Write config.json, model.safetensors and tokenizer files for `gguf_file` to `out_dir`."""
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    gguf_file = Path(gguf_file)
    out_dir = Path(out_dir)
    reader = GGUFReader(str(gguf_file))
    config = llama_config(reader)
    state = llama_state_dict(reader, config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config.save_pretrained(out_dir)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer.save_pretrained(out_dir)
