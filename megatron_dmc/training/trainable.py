"""What trains (--dmc-trainable): the release trains everything; the frozen-base sets train
only the decision heads (dmc-heads), q/k/v/o and the heads (attention), or LoRA adapters and
the heads (lora). Frozen parameters get requires_grad=False before Megatron's DDP wraps the
model, so they have no gradient buffer and no optimizer state (CpuAdamW and Megatron's
optimizers both take only parameters that require a gradient)."""

from __future__ import annotations

import torch

from megatron_dmc.model.lora import ADAPTER_PARAMS, add_adapters
from megatron_dmc.training.config import RetrofitArgs

DECISION_HEAD_MARKERS = ("decision",)
"""Substrings naming the parameters of the decision (and importance) heads."""

ATTENTION_MARKERS = ("self_attention.linear_qkv.", "self_attention.linear_proj.")
"""q/k/v and output projections (their layer norms excluded, see `_is_attention`)."""


def _is_head(name: str) -> bool:
    return any(marker in name for marker in DECISION_HEAD_MARKERS)


def _is_attention(name: str) -> bool:
    in_attention = any(m in name for m in ATTENTION_MARKERS)
    return in_attention and "layer_norm" not in name and not _is_adapter(name)


def _is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def is_trainable(name: str, trainable: str) -> bool:
    """Whether parameter `name` trains under --dmc-trainable `trainable`."""
    if trainable == "all":
        return True
    if _is_head(name):
        return True
    if trainable == "attention":
        return _is_attention(name)
    return trainable == "lora" and _is_adapter(name)


def apply_trainable(module: torch.nn.Module, args: RetrofitArgs, seed: int) -> list[str]:
    """Add LoRA adapters (lora) and freeze what does not train; returns the names of this
    rank's trainable parameters. Call on the unwrapped model, before DDP."""
    if args.dmc_trainable == "lora":
        add_adapters(module, args.dmc_lora_rank, args.dmc_lora_alpha, args.dmc_lora_mlp, seed)
    names = []
    for name, param in module.named_parameters():
        train = is_trainable(name, args.dmc_trainable)
        param.requires_grad_(train)
        if train:
            names.append(name)
    return names
