"""The decision heads of one DMC layer, tensor-parallel with their KV heads.

Legend: S sequence, B batch, T time (= S), C hidden size, G KV heads on this TP rank.

The weight is stored [2, G, C]: [0, g] gives the alpha logit of KV head g, [1, g] its omega
logit (`ops.heads.decision_head_logits` reads it as [2G, C]: rows 0..G-1 alpha, G..2G-1
omega). Tensor parallel splits axis 1 with the KV heads, so the global tensor [2, G_all, C]
is the same under any TP size and distributed checkpoints reshard it.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer import MegatronModule, TransformerConfig
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

from megatron_dmc.model.lora import drop_absent_params
from megatron_dmc.ops import DecisionLogits, decision_head_logits


def attention_input(
    hidden_SBC: torch.Tensor, linear_qkv: torch.nn.Module, config: TransformerConfig
) -> torch.Tensor:
    """The attention input after the input norm. The local spec norms before the attention;
    the Transformer-Engine spec fuses the norm into `linear_qkv` (`layer_norm_weight`), so
    the heads apply the same RMSNorm themselves (in fp32, as TE does)."""
    weight_C = getattr(linear_qkv, "layer_norm_weight", None)
    if weight_C is None:
        return hidden_SBC
    check_fused_norm(config)
    gamma_C = weight_C + 1.0 if config.layernorm_zero_centered_gamma else weight_C
    x_SBC = hidden_SBC.float()
    rms_SB1 = torch.rsqrt(x_SBC.pow(2).mean(-1, keepdim=True) + config.layernorm_epsilon)
    return (x_SBC * rms_SB1 * gamma_C.float()).to(hidden_SBC.dtype)


def check_fused_norm(config: TransformerConfig) -> None:
    if config.normalization != "RMSNorm":
        raise ValueError(
            f"decision heads under a fused input norm support RMSNorm (Llama) only; got "
            f"{config.normalization}"
        )


class DecisionHeads(MegatronModule):
    """Zero-initialised linear map: attention input -> (alpha, omega) logits per KV head."""

    def __init__(
        self, config: TransformerConfig, num_kv_heads: int, init_val: float, tp_group
    ) -> None:
        super().__init__(config=config)
        self.init_val = init_val
        self.tp_group = tp_group
        self.weight = torch.nn.Parameter(
            torch.zeros(2, num_kv_heads, config.hidden_size, dtype=config.params_dtype)
        )
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=1, stride=1)

    def forward(self, hidden_SBC: torch.Tensor) -> DecisionLogits:
        """Logits [B, G, T] from the (normed) attention input of this rank."""
        if self.config.sequence_parallel:
            x_SBC = gather_from_sequence_parallel_region(hidden_SBC, group=self.tp_group)
            x_BTC = x_SBC.transpose(0, 1)
        else:
            # Transposed before the region: its backward all-reduce must receive the
            # matmul's contiguous gradient (Megatron reduces a copy of a strided one).
            x_BTC = copy_to_tensor_model_parallel_region(
                hidden_SBC.transpose(0, 1), group=self.tp_group
            )
        weight_NC = self.weight.reshape(-1, self.weight.shape[-1])
        return decision_head_logits(x_BTC, weight_NC, self.init_val)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        key = f"{prefix}weight"
        groups = {}
        if metadata and metadata.get("dp_cp_group") is not None:
            groups = dict(tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        tensor = make_tp_sharded_tensor_for_checkpoint(
            self.weight, key, tp_axis=1, prepend_offsets=sharded_offsets, **groups
        )
        return {key: tensor}


def is_decision_head_key(key: str) -> bool:
    """A state-dict or checkpoint key of a decision-head weight."""
    return key.endswith("dmc_decision_proj.weight")


def drop_absent_heads(sharded: dict, directory) -> list[str]:
    """Remove from a load request the decision heads that the checkpoint at `directory`
    lacks (the vanilla model a heads-mode retrofit starts from): they keep their zero
    initialisation. Returns their state-dict keys."""
    return drop_absent_params(sharded, directory, is_decision_head_key)
