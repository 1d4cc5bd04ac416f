"""DMC self-attention plugged into Megatron-Core through two hooks of `SelfAttention`.

Legend: S sequence, B batch, H query heads (this TP rank), G KV heads (this TP rank),
T time (= S), D head dim, E = D + 1.

Megatron's `Attention.forward` calls, in order: `_adjust_key_value_for_inference` with
the raw pre-RoPE q/k/v, RoPE on the query and on whatever key that hook returned, then
`core_attention`. DMC uses exactly that path:

1. hook (`_adjust_key_value_for_inference`): decisions alpha and importance omega from
   channel D-1, windowed partial accumulations ktilde/vtilde of the pre-RoPE keys and
   values, and the attention bias. Returns q and ktilde with channel D-1 zeroed, so
   Megatron rotates ktilde_j at position j: the newest token of its slot.
2. `DMCCoreAttention`: zeroes channel D-1 after RoPE and runs the biased attention.

The bias travels to the core attention as one extra channel of the value tensor
([S, B, G, E]), so it is an ordinary input of the core attention: selective recompute
(`recompute_modules=["core_attn"]`) checkpoints it like q, k and v.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import MegatronModule, TransformerConfig
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.utils import get_pg_rank

from megatron_dmc.model.layout import to_bhtd, to_sbhd
from megatron_dmc.ops import (
    DMCConfig,
    DMCDecisions,
    attention_bias,
    dmc_attention,
    logistic_from_uniform,
    make_decisions,
    windowed_partial_accumulation,
    zero_decision_channel,
)


def check_dmc_config(config: TransformerConfig) -> None:
    """Settings DMC attention cannot run under, rejected when the layer is built."""
    if config.recompute_granularity == "full":
        raise ValueError(
            "full-layer activation recompute is not supported with DMC attention (the "
            "decisions feeding the compression loss would be recorded without gradient); "
            "use recompute_granularity='selective' with recompute_modules=['core_attn']"
        )
    if config.context_parallel_size != 1:
        raise ValueError("DMC attention does not support context parallelism; set it to 1")


class DMCSelfAttention(SelfAttention):
    """`SelfAttention` whose keys/values are DMC partial accumulations (see module doc).

    Decisions are reported to `self.collector` (a `DecisionCollector` that the owning
    `DMCGPTModel` attaches); without one they are simply not recorded.
    """

    def __init__(self, *args, dmc_config: DMCConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_dmc_config(self.config)
        self.dmc_config = dmc_config or DMCConfig()
        self.collector = None

    def _adjust_key_value_for_inference(
        self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
    ):
        if inference_context is not None or kwargs.get("inference_params") is not None:
            raise NotImplementedError(
                "DMC decoding keeps a ragged per-head cache: use megatron_dmc.inference, "
                "not Megatron-Core's inference context"
            )
        if self.attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"DMC attention is causal; got mask type {self.attn_mask_type}")
        q_BHTD, k_BGTD, v_BGTD = to_bhtd(query), to_bhtd(key), to_bhtd(value)
        decisions = self._decisions(q_BHTD, k_BGTD)
        ktilde_BGTD, vtilde_BGTD = windowed_partial_accumulation(
            zero_decision_channel(k_BGTD),
            v_BGTD,
            decisions.alpha_BGT,
            decisions.omega_BGT,
            self.dmc_config.window,
        )
        bias_BGT = attention_bias(decisions.alpha_BGT, hard=not self.training)
        if self.collector is not None:
            self.collector.record(self.layer_number, decisions.alpha_ste_BGT)
        value_BGTE = torch.cat([vtilde_BGTD, bias_BGT[..., None]], dim=-1)
        key = to_sbhd(ktilde_BGTD)
        return (
            zero_decision_channel(query),
            key,
            to_sbhd(value_BGTE),
            rotary_pos_emb,
            self.attn_mask_type,
            None,
        )

    def _decisions(self, q_BHTD: torch.Tensor, k_BGTD: torch.Tensor) -> DMCDecisions:
        noise_BGT = self._logistic_noise(k_BGTD) if self.training else None
        return make_decisions(q_BHTD, k_BGTD, self.dmc_config, self.training, noise_BGT=noise_BGT)

    def _logistic_noise(self, k_BGTD: torch.Tensor) -> torch.Tensor:
        """Logistic(0, 1) noise for this rank's KV heads.

        Drawn for all KV heads of the layer from a generator keyed by (seed, step,
        microbatch, layer, data-parallel rank) and sliced to this rank's heads, so any
        tensor/pipeline layout sees the same noise.
        """
        b, g, t = k_BGTD.shape[:3]
        generator = self.collector.generator(self.layer_number) if self.collector else None
        u_BGT = torch.rand((b, g * self.world_size, t), generator=generator, dtype=k_BGTD.dtype)
        first = get_pg_rank(self.tp_group) * g
        return logistic_from_uniform(u_BGT[:, first : first + g].to(k_BGTD.device))


class DMCCoreAttention(MegatronModule):
    """Causal attention over RoPE'd partial accumulations with the DMC bias.

    Takes the value tensor with the bias as its last channel (see module doc); returns
    [S, B, H*D] like Megatron's `DotProductAttention`. `attention_mask` is unused: the
    attention is causal by construction.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("DMC attention takes no extra attention_bias or packed sequences")
        q_BHTD = to_bhtd(zero_decision_channel(query))
        k_BGTD = to_bhtd(zero_decision_channel(key))
        value_BGTE = to_bhtd(value)
        out_BHTD = dmc_attention(
            q_BHTD, k_BGTD, value_BGTE[..., :-1], value_BGTE[..., -1], self.softmax_scale
        )
        s, b = query.shape[0], query.shape[1]
        return to_sbhd(out_BHTD).reshape(s, b, -1)
