"""Tiny random Llama models whose decision channel really fires (no downloads)."""

from __future__ import annotations

import torch

from megatron_dmc.inference.model import LlamaForInference
from megatron_dmc.ops import DMCConfig
from megatron_dmc.schema.llama import LlamaShape


def tiny_shape(heads=4, groups=2, layers=2, head_dim=16, vocab=97, tie=False) -> LlamaShape:
    return LlamaShape(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=head_dim,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )


def tiny_model(
    dmc: bool | DMCConfig = True, seed: int = 0, decision_scale: float = 8.0, **shape_kw
) -> LlamaForInference:
    """Random weights; the k_proj rows of channel D-1 are scaled so that about a third of the
    tokens merge (k[D-1] > 5), and q's channel D-1 spreads the importance weights. With a
    heads-mode DMCConfig the decision heads get small random weights (logits of order 10)."""
    torch.manual_seed(seed)
    shape = tiny_shape(**shape_kw)
    config = dmc if isinstance(dmc, DMCConfig) else (DMCConfig() if dmc else None)
    model = LlamaForInference(shape, config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "dmc_decision_proj" in name:
                p.normal_(0.0, 0.015)
                continue
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.8, 1.2)
        d = shape.head_dim
        for layer in model.model.layers:
            k_rows = layer.self_attn.k_proj.weight.view(shape.num_key_value_heads, d, -1)
            k_rows[:, d - 1] *= decision_scale / k_rows[:, d - 1].norm(dim=-1, keepdim=True)
            q_rows = layer.self_attn.q_proj.weight.view(shape.num_attention_heads, d, -1)
            q_rows[:, d - 1] *= 3.0 / q_rows[:, d - 1].norm(dim=-1, keepdim=True)
    return model
