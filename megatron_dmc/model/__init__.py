"""The Megatron-Core seam: DMC / zero_out attention specs, Llama configs, model builder."""

from megatron_dmc.model.attention import DMCCoreAttention, DMCSelfAttention
from megatron_dmc.model.builder import build_model
from megatron_dmc.model.config import check_layout, to_transformer_config
from megatron_dmc.model.decisions import DecisionCollector, DecisionSums, gather_alpha_means
from megatron_dmc.model.gpt import DMCGPTModel, pipeline_seq_length
from megatron_dmc.model.qkv import zero_decision_rows
from megatron_dmc.model.spec import ATTENTION_MODES, layer_spec
from megatron_dmc.model.zero_out import ZeroOutSelfAttention, set_zero_out_lambda

__all__ = [
    "ATTENTION_MODES",
    "DMCCoreAttention",
    "DMCGPTModel",
    "DMCSelfAttention",
    "DecisionCollector",
    "DecisionSums",
    "ZeroOutSelfAttention",
    "build_model",
    "check_layout",
    "gather_alpha_means",
    "layer_spec",
    "pipeline_seq_length",
    "set_zero_out_lambda",
    "to_transformer_config",
    "zero_decision_rows",
]
