import pytest
import torch

from megatron_dmc.model import to_transformer_config
from megatron_dmc.schema.llama import LlamaShape


def test_published_shapes():
    llama70 = LlamaShape.from_yaml("llama2_70b")
    assert (llama70.num_hidden_layers, llama70.hidden_size, llama70.num_attention_heads) == (
        80,
        8192,
        64,
    )
    assert (llama70.num_key_value_heads, llama70.intermediate_size, llama70.vocab_size) == (
        8,
        28672,
        32000,
    )
    llama13 = LlamaShape.from_yaml("llama2_13b")
    assert (llama13.num_hidden_layers, llama13.hidden_size, llama13.intermediate_size) == (
        40,
        5120,
        13824,
    )
    llama7 = LlamaShape.from_yaml("llama2_7b")
    assert (llama7.num_hidden_layers, llama7.hidden_size, llama7.head_dim) == (32, 4096, 128)
    assert not llama7.tie_word_embeddings and llama7.max_position_embeddings == 4096
    smol = LlamaShape.from_yaml("smollm2_135m")
    assert (smol.num_key_value_heads, smol.head_dim, smol.rope_theta) == (3, 64, 100000)
    assert smol.tie_word_embeddings and smol.vocab_size == 49152


def test_transformer_config_is_llama_on_cpu():
    config = to_transformer_config(LlamaShape.from_yaml("tiny_gqa"), tp=2, pp=2)
    assert config.normalization == "RMSNorm" and config.gated_linear_unit
    assert not config.add_bias_linear and config.activation_func is torch.nn.functional.silu
    assert config.use_cpu_initialization and not config.apply_rope_fusion
    assert config.num_query_groups == 2 and config.kv_channels == 16


def test_path_and_unknown_keys(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("num_hidden_layers: 2\nhidden_size: 32\nnum_attention_heads: 2\n")
    with pytest.raises(
        ValueError,
        match="missing required keys \\['intermediate_size', 'num_key_value_heads', 'vocab_size'\\]",
    ):
        LlamaShape.from_yaml(path)
    path.write_text(path.read_text() + "num_key_value_heads: 2\nintermediate_size: 8\n")
    with pytest.raises(ValueError, match="missing required keys \\['vocab_size'\\]"):
        LlamaShape.from_yaml(path)
    path.write_text(path.read_text() + "vocab_size: 8\n")
    assert LlamaShape.from_yaml(path).head_dim == 16
    with pytest.raises(ValueError, match="known model configs"):
        LlamaShape.from_yaml("no_such_model")
    with pytest.raises(ValueError, match="unknown model config keys"):
        LlamaShape.from_dict({"num_blocks": 2})
    with pytest.raises(ValueError, match="set head_dim explicitly"):
        LlamaShape(8, 30, 8, 2, 4, 2)


def test_yaml_keys_written_before_the_rename_are_read_under_the_new_names():
    """A main job's model.yaml from before the shape took config.json's names still loads."""
    earlier = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
               "num_query_groups": 2, "ffn_hidden_size": 64, "vocab_size": 100,
               "max_position_embeddings": 64, "rotary_base": 500.0, "norm_epsilon": 1e-6,
               "tie_embeddings": True}  # fmt: skip
    shape = LlamaShape.from_dict(earlier)
    assert (shape.num_hidden_layers, shape.num_key_value_heads, shape.intermediate_size) == (
        2,
        2,
        64,
    )
    assert (shape.rope_theta, shape.rms_norm_eps, shape.tie_word_embeddings) == (500.0, 1e-6, True)
    with pytest.raises(ValueError, match="both spellings of num_layers/num_hidden_layers"):
        LlamaShape.from_dict({**earlier, "num_hidden_layers": 2})


@pytest.mark.parametrize(
    ("name", "tp", "pp", "sp", "message"),
    [
        ("smollm2_135m", 2, 1, False, "num_attention_heads \\(9\\) is not divisible by the tensor"),
        ("tiny_gqa", 4, 1, False, "num_key_value_heads \\(2\\) is not divisible"),
        ("tiny_gqa", 1, 3, False, "num_hidden_layers \\(4\\) is not divisible by the pipeline"),
        ("tiny_gqa", 2, 1, True, "sequence parallel needs"),
    ],
)
def test_bad_layouts_rejected(name, tp, pp, sp, message):
    if sp and torch.cuda.is_available():
        pytest.skip("sequence parallel is allowed with CUDA")
    with pytest.raises(ValueError, match=message):
        to_transformer_config(LlamaShape.from_yaml(name), tp, pp, sequence_parallel=sp)
