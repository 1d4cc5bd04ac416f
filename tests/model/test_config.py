import pytest
import torch

from megatron_dmc.model import ModelConfig


def test_published_shapes():
    llama70 = ModelConfig.from_yaml("llama2_70b")
    assert (llama70.num_layers, llama70.hidden_size, llama70.num_attention_heads) == (80, 8192, 64)
    assert (llama70.num_query_groups, llama70.ffn_hidden_size, llama70.vocab_size) == (
        8,
        28672,
        32000,
    )
    llama13 = ModelConfig.from_yaml("llama2_13b")
    assert (llama13.num_layers, llama13.hidden_size, llama13.ffn_hidden_size) == (40, 5120, 13824)
    llama7 = ModelConfig.from_yaml("llama2_7b")
    assert (llama7.num_layers, llama7.hidden_size, llama7.kv_channels) == (32, 4096, 128)
    assert not llama7.tie_embeddings and llama7.max_position_embeddings == 4096
    smol = ModelConfig.from_yaml("smollm2_135m")
    assert (smol.num_query_groups, smol.kv_channels, smol.rotary_base) == (3, 64, 100000)
    assert smol.tie_embeddings and smol.vocab_size == 49152


def test_transformer_config_is_llama_on_cpu():
    config = ModelConfig.from_yaml("tiny_gqa").to_transformer_config(tp=2, pp=2)
    assert config.normalization == "RMSNorm" and config.gated_linear_unit
    assert not config.add_bias_linear and config.activation_func is torch.nn.functional.silu
    assert config.use_cpu_initialization and not config.apply_rope_fusion
    assert config.num_query_groups == 2 and config.kv_channels == 16


def test_path_and_unknown_keys(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("num_layers: 2\nhidden_size: 32\nnum_attention_heads: 2\n")
    with pytest.raises(ValueError, match="missing required keys"):
        ModelConfig.from_yaml(path)
    path.write_text(path.read_text() + "num_query_groups: 2\nffn_hidden_size: 8\nvocab_size: 8\n")
    with pytest.raises(ValueError, match="missing required keys \\['max_position_embeddings'\\]"):
        ModelConfig.from_yaml(path)
    path.write_text(path.read_text() + "max_position_embeddings: 64\n")
    assert ModelConfig.from_yaml(path).kv_channels == 16
    with pytest.raises(ValueError, match="known names"):
        ModelConfig.from_yaml("no_such_model")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"num_layer": 2})


@pytest.mark.parametrize(
    ("name", "tp", "pp", "sp", "message"),
    [
        ("smollm2_135m", 2, 1, False, "num_attention_heads \\(9\\) is not divisible by the tensor"),
        ("tiny_gqa", 4, 1, False, "num_query_groups \\(2\\) is not divisible"),
        ("tiny_gqa", 1, 3, False, "num_layers \\(4\\) is not divisible by the pipeline"),
        ("tiny_gqa", 2, 1, True, "sequence parallel needs"),
    ],
)
def test_bad_layouts_rejected(name, tp, pp, sp, message):
    if sp and torch.cuda.is_available():
        pytest.skip("sequence parallel is allowed with CUDA")
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_yaml(name).to_transformer_config(tp, pp, sequence_parallel=sp)
