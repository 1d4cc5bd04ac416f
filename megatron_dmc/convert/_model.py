"""The model a conversion writes through."""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_dmc.model import build_model, to_transformer_config
from megatron_dmc.ops import DMCConfig
from megatron_dmc.schema.llama import LlamaShape


def build_gpt_model(shape: LlamaShape) -> GPTModel:
    """The vanilla model at the current TP/PP, weights in shape.dtype; a DMC model with
    decision heads when the shape has them (channel-mode DMC attention has exactly the
    vanilla state-dict keys)."""
    transformer_config = to_transformer_config(
        shape,
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        params_dtype=shape.torch_dtype,
        perform_initialization=False,  # every weight is overwritten by the conversion
    )
    if shape.dmc_decision_heads:
        heads = DMCConfig(decision_source="heads")
        return build_model(shape, "dmc", heads, transformer_config=transformer_config)
    return build_model(shape, "vanilla", transformer_config=transformer_config)
