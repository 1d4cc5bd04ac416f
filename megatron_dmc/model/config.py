"""A `LlamaShape` (the model's one shape record, `megatron_dmc.schema.llama`) as Megatron-Core sees it.

`to_transformer_config(shape, tp, pp)` is a `TransformerConfig` for a Llama block (RMSNorm,
SwiGLU MLP, no biases, rotate-half RoPE) with the settings that work on CPU (see
`megatron_dmc.compat.cpu`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_dmc.compat import cuda_available
from megatron_dmc.schema.llama import LlamaShape


def check_layout(shape: LlamaShape, tp: int, pp: int, sequence_parallel: bool = False) -> None:
    """Reject layouts this model cannot be split into, before any work is done."""
    shape.check_parallel(tp, pp)
    if sequence_parallel and not cuda_available():
        raise ValueError(
            "sequence parallel needs the Transformer-Engine/apex norms (GPU); on CPU "
            "run without sequence_parallel"
        )
    if sequence_parallel and tp == 1:
        raise ValueError("sequence parallel needs tensor parallel size > 1")


def to_transformer_config(
    shape: LlamaShape,
    tp: int = 1,
    pp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    **overrides: Any,
) -> TransformerConfig:
    """A Megatron-Core config for `shape`; `overrides` are TransformerConfig fields."""
    check_layout(shape, tp, pp, sequence_parallel)
    on_cpu = not cuda_available()
    fields = dict(
        num_layers=shape.num_hidden_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_key_value_heads,
        ffn_hidden_size=shape.intermediate_size,
        kv_channels=shape.head_dim,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        normalization="RMSNorm",
        layernorm_epsilon=shape.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=shape.init_method_std,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        batch_p2p_sync=not on_cpu,
        **_NO_FUSIONS,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


_NO_FUSIONS = dict(
    gradient_accumulation_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
    masked_softmax_fusion=False,
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    cross_entropy_loss_fusion=False,
)
