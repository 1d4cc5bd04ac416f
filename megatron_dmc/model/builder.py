"""Build a Llama-shaped Megatron-Core GPT model for one attention mode."""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megatron_dmc.compat import cpu_device_mode, ensure_cpu_compat
from megatron_dmc.model.config import check_layout, to_transformer_config
from megatron_dmc.model.gpt import DMCGPTModel
from megatron_dmc.model.spec import layer_spec
from megatron_dmc.ops import DMCConfig
from megatron_dmc.schema.llama import LlamaShape


def build_model(
    shape: LlamaShape,
    attention: str = "vanilla",
    dmc_config: DMCConfig | None = None,
    transformer_config: TransformerConfig | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    noise_seed: int = 0,
) -> GPTModel:
    """A GPTModel (vanilla, zero_out) or DMCGPTModel (dmc) for this rank's stage.

    Tensor/pipeline sizes come from `parallel_state` (call `initialize_distributed`
    first); `pre_process`/`post_process` default to this rank being the first/last
    pipeline stage; `transformer_config` defaults to `to_transformer_config(shape, tp, pp)`.
    """
    ensure_cpu_compat()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = transformer_config or to_transformer_config(shape, tp, pp)
    if (config.tensor_model_parallel_size, config.pipeline_model_parallel_size) != (tp, pp):
        raise ValueError(
            f"transformer_config is for TP={config.tensor_model_parallel_size}, "
            f"PP={config.pipeline_model_parallel_size} but parallel_state has TP={tp}, PP={pp}"
        )
    check_layout(shape, tp, pp, config.sequence_parallel)
    kwargs = dict(
        config=config,
        transformer_layer_spec=layer_spec(attention, dmc_config),
        vocab_size=shape.padded_vocab_size(tp),
        max_sequence_length=shape.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage()
        if pre_process is None
        else pre_process,
        post_process=parallel_state.is_pipeline_last_stage()
        if post_process is None
        else post_process,
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=shape.rope_theta,
    )
    with cpu_device_mode():  # tied embeddings at PP > 1 call Tensor.cuda() while building
        if attention == "dmc":
            return DMCGPTModel(**kwargs, noise_seed=noise_seed)
        return GPTModel(**kwargs)
