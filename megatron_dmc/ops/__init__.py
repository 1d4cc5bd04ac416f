"""Pure-tensor DMC maths: no Megatron import, single device, [batch, heads, time, dim] layout."""

from megatron_dmc.ops.accumulate import windowed_partial_accumulation
from megatron_dmc.ops.attention import (
    HARD_MASK_VALUE,
    attention_bias,
    dmc_attention,
    dmc_attention_reference,
)
from megatron_dmc.ops.config import DECISION_SOURCES, DMS_DECISION_SOURCES, KV_METHODS, DMCConfig
from megatron_dmc.ops.decisions import (
    decision_logits,
    force_first_append,
    importance_weights,
    rope_without_decision_channel,
    rope_without_query_decision_channel,
    zero_decision_channel,
    zero_query_decision_channel,
)
from megatron_dmc.ops.dms import DEFAULT_DMS_WINDOW, dms_config, dms_sequential_reference
from megatron_dmc.ops.forward import (
    DMCDecisions,
    dmc_self_attention,
    key_for_accumulation,
    make_decisions,
    resolve_decision_logits,
    rope_for_attention,
    rope_for_query,
    slot_keys_values,
)
from megatron_dmc.ops.heads import (
    HEAD_LOGIT_SCALE,
    DecisionLogits,
    channel_decision_logits,
    decision_head_logits,
    head_logits_from_outputs,
    importance_from_logits,
    query_decision_logits,
)
from megatron_dmc.ops.loss import (
    CRSchedule,
    ZeroOutSchedule,
    achieved_compression_ratio,
    compression_loss,
    training_length_cr,
)
from megatron_dmc.ops.reference import dmc_sequential_reference
from megatron_dmc.ops.relaxation import (
    eval_decisions,
    gumbel_sigmoid,
    hard_decisions,
    logistic_from_uniform,
    straight_through,
)
from megatron_dmc.ops.rope import apply_rope, rope_cos_sin, rotate_half
from megatron_dmc.ops.window import counted_decisions, local_attention

__all__ = [
    "DECISION_SOURCES",
    "DEFAULT_DMS_WINDOW",
    "DMS_DECISION_SOURCES",
    "HARD_MASK_VALUE",
    "HEAD_LOGIT_SCALE",
    "KV_METHODS",
    "CRSchedule",
    "DMCConfig",
    "DMCDecisions",
    "DecisionLogits",
    "ZeroOutSchedule",
    "achieved_compression_ratio",
    "apply_rope",
    "attention_bias",
    "channel_decision_logits",
    "compression_loss",
    "counted_decisions",
    "decision_head_logits",
    "decision_logits",
    "dmc_attention",
    "dmc_attention_reference",
    "dmc_self_attention",
    "dmc_sequential_reference",
    "dms_config",
    "dms_sequential_reference",
    "eval_decisions",
    "force_first_append",
    "gumbel_sigmoid",
    "hard_decisions",
    "head_logits_from_outputs",
    "importance_from_logits",
    "importance_weights",
    "key_for_accumulation",
    "local_attention",
    "logistic_from_uniform",
    "make_decisions",
    "query_decision_logits",
    "resolve_decision_logits",
    "rope_cos_sin",
    "rope_for_attention",
    "rope_for_query",
    "rope_without_decision_channel",
    "rope_without_query_decision_channel",
    "rotate_half",
    "slot_keys_values",
    "straight_through",
    "training_length_cr",
    "windowed_partial_accumulation",
    "zero_decision_channel",
    "zero_query_decision_channel",
]
