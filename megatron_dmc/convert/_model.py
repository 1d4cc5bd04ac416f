"""LlamaShape <-> the project's ModelConfig, and the model a conversion writes through."""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_dmc.convert.llama_config import LlamaShape
from megatron_dmc.model import ModelConfig, build_model
from megatron_dmc.ops import DMCConfig


def model_config_from_shape(shape: LlamaShape) -> ModelConfig:
    return ModelConfig(
        num_layers=shape.num_hidden_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_key_value_heads,
        ffn_hidden_size=shape.intermediate_size,
        vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_position_embeddings,
        rotary_base=shape.rope_theta,
        norm_epsilon=shape.rms_norm_eps,
        tie_embeddings=shape.tie_word_embeddings,
        head_dim=shape.head_dim,
    )


def shape_from_model_config(
    config: ModelConfig, dtype: str = "float32", decision_heads: bool = False
) -> LlamaShape:
    """The converter's view of a ModelConfig (for checkpoint_metadata of trained models)."""
    return LlamaShape(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups,
        head_dim=config.kv_channels,
        rms_norm_eps=config.norm_epsilon,
        rope_theta=config.rotary_base,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_embeddings,
        dtype=dtype,
        dmc_decision_heads=decision_heads,
    )


def build_gpt_model(shape: LlamaShape) -> GPTModel:
    """The vanilla model at the current TP/PP, weights in shape.dtype; a DMC model with
    decision heads when the shape has them (channel-mode DMC attention has exactly the
    vanilla state-dict keys)."""
    config = model_config_from_shape(shape)
    transformer_config = config.to_transformer_config(
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        params_dtype=shape.torch_dtype,
        perform_initialization=False,  # every weight is overwritten by the conversion
    )
    if shape.dmc_decision_heads:
        heads = DMCConfig(decision_source="heads")
        return build_model(config, "dmc", heads, transformer_config=transformer_config)
    return build_model(config, "vanilla", transformer_config=transformer_config)
