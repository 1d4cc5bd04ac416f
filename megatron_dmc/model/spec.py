"""Layer specs: Megatron-Core's GPT layer with the attention swapped for DMC or zero_out.

The local (pure torch) spec on CPU; the Transformer-Engine spec when TE imports and
CUDA is present. Only `self_attention.module` and its `core_attention` change, so the
state-dict keys are the stock ones.
"""

from __future__ import annotations

import copy
import importlib.util

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_dmc.compat import cuda_available
from megatron_dmc.model.attention import DMCCoreAttention, DMCSelfAttention
from megatron_dmc.model.zero_out import ZeroOutSelfAttention, zero_out_core_attention
from megatron_dmc.ops import DMCConfig

ATTENTION_MODES = ("vanilla", "zero_out", "dmc")


def use_transformer_engine() -> bool:
    return cuda_available() and importlib.util.find_spec("transformer_engine") is not None


def base_layer_spec() -> ModuleSpec:
    if use_transformer_engine():
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def layer_spec(attention: str = "vanilla", dmc_config: DMCConfig | None = None) -> ModuleSpec:
    """The transformer-layer spec for one attention mode: vanilla, zero_out or dmc.
    `dmc_config` (dmc; zero_out: which channel it anneals) defaults to `DMCConfig()`."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}; got {attention!r}")
    if dmc_config is not None and attention == "vanilla":
        raise ValueError("dmc_config is used with attention 'dmc' or 'zero_out', not 'vanilla'")
    spec = copy.deepcopy(base_layer_spec())
    attn = spec.submodules.self_attention
    if attention == "zero_out":
        attn.module = ZeroOutSelfAttention
        if dmc_config is not None:
            attn.params = {**attn.params, "decision_source": dmc_config.decision_source}
        attn.submodules.core_attention = zero_out_core_attention(attn.submodules.core_attention)
    elif attention == "dmc":
        attn.module = DMCSelfAttention
        attn.params = {**attn.params, "dmc_config": dmc_config or DMCConfig()}
        attn.submodules.core_attention = DMCCoreAttention
    return spec
