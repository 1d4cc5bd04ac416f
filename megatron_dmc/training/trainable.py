"""What trains (--dmc-trainable): the release trains everything; the frozen-base sets train
only the decision heads (dmc-heads), q/k/v/o and the heads (attention), or LoRA adapters and
the heads (lora). Frozen parameters get requires_grad=False before Megatron's DDP wraps the
model, so they have no gradient buffer and no optimizer state (CpuAdamW and Megatron's
optimizers both take only parameters that require a gradient)."""

from __future__ import annotations

from typing import Any

import torch

from megatron_dmc.model.lora import ADAPTER_PARAMS, add_adapters
from megatron_dmc.training.config import RetrofitArgs

DECISION_HEAD_MARKERS = ("dmc_decision_proj.",)
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
    if not names:
        raise ValueError(
            f"--dmc-trainable {args.dmc_trainable} leaves nothing to train in this model (no "
            "decision heads: a zero_out or vanilla stage); run the DMC stages only, e.g. "
            "--dmc-stage retrofit, or choose another set"
        )
    return names


def check_checkpoint(args: RetrofitArgs, common: dict[str, Any], load_optim: bool) -> None:
    """Refuse, before any work, a checkpoint whose adapters or optimizer state do not fit
    this run's trainable set (`common`: the checkpoint's common.pt)."""
    saved = common.get("args") or {}
    if not saved:
        return
    trainable = saved.get("dmc_trainable", "all")
    if trainable == "lora":
        shape = (saved.get("dmc_lora_rank"), saved.get("dmc_lora_mlp", False))
        if args.dmc_trainable != "lora" or shape != (args.dmc_lora_rank, args.dmc_lora_mlp):
            raise ValueError(
                f"the checkpoint holds LoRA adapters (rank {shape[0]}, mlp {shape[1]}): continue "
                f"it with --dmc-trainable lora --dmc-lora-rank {shape[0]}"
                f"{' --dmc-lora-mlp' if shape[1] else ''}, or export it (export-hf folds the "
                "adapters into the weights) and start from that"
            )
    if load_optim and trainable != args.dmc_trainable:
        raise ValueError(
            f"the checkpoint's optimizer state is for --dmc-trainable {trainable}, not "
            f"{args.dmc_trainable}: keep it, or take the weights only (--finetune, or "
            "--no-load-optim)"
        )
