"""Tiny DMC Llama configs, decisions that really fire, and a reference built on megatron_dmc.ops."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_dmc.hf import DMCLlamaForCausalLM, LlamaDMCConfig
from megatron_dmc.ops import (
    DMCConfig,
    decision_head_logits,
    dmc_self_attention,
    dmc_sequential_reference,
    rope_without_decision_channel,
)


def tiny_config(**overrides) -> LlamaDMCConfig:
    fields = dict(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return LlamaDMCConfig(**fields)


def decision_rows(attention) -> tuple[range, range]:
    """Output rows of q_proj / k_proj that produce channel D-1 of every head."""
    d = attention.head_dim
    return (
        range(d - 1, attention.q_proj.out_features, d),
        range(d - 1, attention.k_proj.out_features, d),
    )


@torch.no_grad()
def fire_decisions(model, seed: int = 0, k_std: float = 8.0, merge_bias: float | None = None):
    """Scale the channel-(D-1) rows so that k[D-1] spreads around c: some tokens merge, some
    append. With attention biases, merge_bias shifts k[D-1] (c + 3 gives long merge runs)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    for layer in model.model.layers:
        attention = layer.self_attn
        q_rows, k_rows = decision_rows(attention)
        for rows, std in ((q_rows, 3.0), (k_rows, k_std)):
            proj = attention.q_proj if rows is q_rows else attention.k_proj
            for row in rows:
                proj.weight[row] = torch.randn(hidden, generator=gen) * std / hidden**0.5
        if merge_bias is not None:
            for row in k_rows:
                attention.k_proj.bias[row] = merge_bias
    return model


@torch.no_grad()
def zero_decision_rows(model):
    """Stage-1 end state: the weight rows that produce channel D-1 are exactly zero."""
    for layer in model.model.layers:
        attention = layer.self_attn
        q_rows, k_rows = decision_rows(attention)
        attention.q_proj.weight[list(q_rows)] = 0.0
        attention.k_proj.weight[list(k_rows)] = 0.0
    return model


def dmc_model(seed: int = 0, **overrides) -> DMCLlamaForCausalLM:
    torch.manual_seed(seed)
    return DMCLlamaForCausalLM(tiny_config(**overrides)).eval()


def _projections(attention, hidden_states):
    shape = (*hidden_states.shape[:-1], -1, attention.head_dim)
    return tuple(
        proj(hidden_states).view(shape).transpose(1, 2)
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
    )


def _ops_dmc_forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
    q, k, v = _projections(self, hidden_states)
    cos, sin = position_embeddings
    logits = None
    if self.dmc_config.decision_source == "heads":
        logits = decision_head_logits(hidden_states, self.dmc_weight, self.dmc_config.init_val)
    if self.sequential:
        out, self.lengths = dmc_sequential_reference(
            q, k, v, cos[0], sin[0], self.dmc_config, logits
        )
    else:
        out, self.decisions = dmc_self_attention(
            q, k, v, cos[0], sin[0], self.dmc_config, training=False, logits=logits
        )
    return self.o_proj(out.transpose(1, 2).flatten(2)), None


def _stage1_forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
    q, k, v = _projections(self, hidden_states)
    cos, sin = position_embeddings
    q, k = (rope_without_decision_channel(x, cos[0], sin[0]) for x in (q, k))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return self.o_proj(out.transpose(1, 2).flatten(2)), None


def reference_llama(model: DMCLlamaForCausalLM, kind: str = "ops") -> LlamaForCausalLM:
    """transformers' own Llama on the same weights, its attention computed by megatron_dmc.ops:
    kind="ops" the eval-mode parallel form, "sequential" Algorithm 1 token by token
    (`dmc_sequential_reference`), "stage1" plain attention without channel D-1."""
    fields = model.config.to_dict()
    for key in [k for k in fields if k.startswith("dmc_")] + ["model_type", "architectures"]:
        fields.pop(key, None)
    reference = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    state = model.state_dict()
    heads = {key: state.pop(key) for key in list(state) if "dmc_decision_proj" in key}
    reference.load_state_dict(state)
    forward = _stage1_forward if kind == "stage1" else _ops_dmc_forward
    config = model.config
    dmc_config = DMCConfig(
        window_size=config.dmc_window_size,
        init_val=float(config.dmc_init_val),
        decision_source=config.dmc_decision_source,
        merge_delay=config.dmc_merge_delay,
        kv_method=config.dmc_kv_method,
    )
    for index, layer in enumerate(reference.model.layers):
        attention = layer.self_attn
        attention.dmc_config, attention.sequential = dmc_config, kind == "sequential"
        attention.dmc_weight = heads.get(f"model.layers.{index}.self_attn.dmc_decision_proj.weight")
        attention.forward = types.MethodType(forward, attention)
    return reference


@torch.no_grad()
def fire_heads(model, seed: int = 0, std: float = 0.06):
    """Random decision-head weights: with the heads' scale of 100 the merge logits spread
    around 0, so some tokens merge and some append."""
    gen = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        weight = layer.self_attn.dmc_decision_proj.weight
        weight.copy_(torch.randn(weight.shape, generator=gen) * std / weight.shape[1] ** 0.5)
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())
