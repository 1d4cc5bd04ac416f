"""GGUF -> HF Llama on a tiny model written as GGUF the way llama.cpp's converter does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_dmc.assets.gguf_llama import (
    GLOBAL_NAMES,
    LAYER_NAMES,
    hf_name,
    llama_config,
    llama_state_dict,
)

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


def _llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation (rotate-half -> interleaved pairs)."""
    return (
        w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _gguf_name(name: str) -> str:
    inverse = {v: k for k, v in GLOBAL_NAMES.items()}
    if name in inverse:
        return inverse[name]
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}." + {v: k for k, v in LAYER_NAMES.items()}[rest]


def _tiny_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _write_gguf(model, path) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        x = tensor.numpy()
        if name.endswith("q_proj.weight"):
            x = _llama_cpp_permute(x, cfg.num_attention_heads)
        if name.endswith("k_proj.weight"):
            x = _llama_cpp_permute(x, cfg.num_key_value_heads)
        if name == "model.embed_tokens.weight":
            q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(
                _gguf_name(name), q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
        else:
            w.add_tensor(_gguf_name(name), x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf_loads_into_the_same_hf_model(tmp_path):
    model = _tiny_model()
    _write_gguf(model, tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "tiny.gguf"))
    config = llama_config(reader)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (4, 2, 64)
    assert config.tie_word_embeddings and config.rope_parameters["rope_theta"] == 10000.0
    assert config.rms_norm_eps == 1e-5
    state = llama_state_dict(reader, config)
    loaded = transformers.LlamaForCausalLM(config).eval()
    loaded.load_state_dict(state, strict=False)
    embed = model.model.embed_tokens.weight
    assert torch.allclose(state["model.embed_tokens.weight"], embed, atol=2e-2)  # Q8_0
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(state["model.embed_tokens.weight"])
        ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    for name, tensor in model.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(state[name], tensor), name


def test_unknown_tensor_name_is_an_error():
    assert hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match="no Llama mapping"):
        hf_name("blk.0.attn_q_norm.weight")
