"""DMC self-attention plugged into Megatron-Core through two hooks of `SelfAttention`.

Legend: S sequence, B batch, H query heads (this TP rank), G KV heads (this TP rank),
T time (= S), D head dim, E = D + 1 (merge delay W > 0: 2D + 1).

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

Decision heads (`decision_source="heads"`): `get_query_key_value_tensors` also runs the
layer's `dmc_decision_proj` on the normed attention input; channel D-1 is then left alone
(no zeroing anywhere, plain RoPE). Merge delay W > 0: the hook also returns the exact keys
as G more key heads ([S, B, 2G, D], rotated by Megatron like the rest) and the exact values
beside vtilde in the value tensor ([vtilde, v, bias]).

DMS (`kv_method="dms"`, `ops.dms`): the same path with one token per slot (no
accumulation); the bias log(1 - alpha_{j+1}) then evicts token j once it is more than W
behind the query. With DMS's query neuron (`decision_source="query"`) the hook reads the
decisions from channel D-1 of each group's first query head and zeroes that channel; the
core attention zeroes it again after RoPE (keys untouched).

`compression_off = True` turns the layer into plain causal attention of the same weights
(nothing zeroed, merged or recorded): the distillation teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import MegatronModule, TransformerConfig
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.utils import get_pg_rank

from megatron_dmc.model.heads import DecisionHeads, attention_input, check_fused_norm
from megatron_dmc.model.layout import scale_query_decision_channel, to_bhtd, to_sbhd
from megatron_dmc.ops import (
    DecisionLogits,
    DMCConfig,
    DMCDecisions,
    attention_bias,
    counted_decisions,
    dmc_attention,
    key_for_accumulation,
    logistic_from_uniform,
    make_decisions,
    slot_keys_values,
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
        self.core_attention.dmc_config = self.dmc_config
        self.collector = None
        self._head_logits: DecisionLogits | None = None
        if self.dmc_config.uses_heads:
            if hasattr(self.linear_qkv, "layer_norm_weight"):
                check_fused_norm(self.config)
            self.dmc_decision_proj = DecisionHeads(
                self.config,
                self.num_query_groups_per_partition,
                self.dmc_config.init_val,
                self.pg_collection.tp,
            )

    @property
    def compression_off(self) -> bool:
        """True: plain causal attention of the same weights (the distillation teacher)."""
        return self.core_attention.compression_off

    @compression_off.setter
    def compression_off(self, value: bool) -> None:
        self.core_attention.compression_off = bool(value)

    def get_query_key_value_tensors(self, hidden_states, *args, **kwargs):
        self._head_logits = None
        if self.dmc_config.uses_heads and not self.compression_off:
            x_SBC = attention_input(hidden_states, self.linear_qkv, self.config)
            self._head_logits = self.dmc_decision_proj(x_SBC)
        return super().get_query_key_value_tensors(hidden_states, *args, **kwargs)

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
        if self.compression_off:
            if self.collector is not None:
                self.collector.record_uncompressed(key.shape[1], key.shape[0], key.device)
            return query, key, value, rotary_pos_emb, self.attn_mask_type, None
        q_BHTD, k_BGTD, v_BGTD = to_bhtd(query), to_bhtd(key), to_bhtd(value)
        decisions = self._decisions(q_BHTD, k_BGTD)
        k_in_BGTD = key_for_accumulation(k_BGTD, self.dmc_config)
        ktilde_BGTD, vtilde_BGTD = slot_keys_values(
            k_in_BGTD, v_BGTD, decisions.alpha_BGT, decisions.omega_BGT, self.dmc_config
        )
        bias_BGT = attention_bias(decisions.alpha_BGT, hard=not self.training)
        if self.collector is not None:
            counted_BGT = counted_decisions(decisions.alpha_ste_BGT, self.dmc_config.merge_delay)
            self.collector.record(self.layer_number, counted_BGT)
        values = [vtilde_BGTD, bias_BGT[..., None]]
        if self.dmc_config.merge_delay:
            ktilde_BGTD = torch.cat([ktilde_BGTD, k_in_BGTD], dim=1)
            values.insert(1, v_BGTD)
        query = _without_decision_channel(query, k_BGTD.shape[1], self.dmc_config)
        return (
            query,
            to_sbhd(ktilde_BGTD),
            to_sbhd(torch.cat(values, dim=-1)),
            rotary_pos_emb,
            self.attn_mask_type,
            None,
        )

    def _decisions(self, q_BHTD: torch.Tensor, k_BGTD: torch.Tensor) -> DMCDecisions:
        noise_BGT = self._logistic_noise(k_BGTD) if self.training else None
        logits, self._head_logits = self._head_logits, None
        return make_decisions(
            q_BHTD, k_BGTD, self.dmc_config, self.training, noise_BGT=noise_BGT, logits=logits
        )

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
    attention is causal by construction. The owning `DMCSelfAttention` sets `dmc_config`
    and `compression_off`.
    """

    compression_off: bool = False
    dmc_config: DMCConfig = DMCConfig()

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
        if self.compression_off:
            out_BHTD = self._vanilla(to_bhtd(query), to_bhtd(key), to_bhtd(value))
        else:
            out_BHTD = self._dmc(query, key, value)
        s, b = query.shape[0], query.shape[1]
        return to_sbhd(out_BHTD).reshape(s, b, -1)

    def _dmc(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self.dmc_config.uses_channel:
            key = zero_decision_channel(key)
        groups = value.shape[2]
        query = _without_decision_channel(query, groups, self.dmc_config)
        q_BHTD, k_BSTD, value_BGTE = to_bhtd(query), to_bhtd(key), to_bhtd(value)
        bias_BGT = value_BGTE[..., -1]
        delay = self.dmc_config.merge_delay
        if not delay:
            return dmc_attention(q_BHTD, k_BSTD, value_BGTE[..., :-1], bias_BGT, self.softmax_scale)
        ktilde_BGTD, k_BGTD = k_BSTD.chunk(2, dim=1)
        vtilde_BGTD, v_BGTD = value_BGTE[..., :-1].chunk(2, dim=-1)
        return dmc_attention(
            q_BHTD, ktilde_BGTD, vtilde_BGTD, bias_BGT, self.softmax_scale, k_BGTD, v_BGTD, delay
        )

    def _vanilla(self, q_BHTD, k_BGTD, v_BGTD) -> torch.Tensor:
        group = q_BHTD.shape[1] // k_BGTD.shape[1]
        return F.scaled_dot_product_attention(
            q_BHTD, k_BGTD, v_BGTD, is_causal=True, scale=self.softmax_scale, enable_gqa=group > 1
        )


def _without_decision_channel(query_SBHD: torch.Tensor, groups: int, config: DMCConfig):
    """Queries with the repurposed channel zeroed: D-1 of every head (channel), of each
    group's first head (DMS's query neuron) or none (heads)."""
    if config.uses_channel:
        return zero_decision_channel(query_SBHD)
    if config.uses_query:
        return scale_query_decision_channel(query_SBHD, groups, 0.0)
    return query_SBHD
