"""The one name/layout table between HF Llama and Megatron-Core GPTModel, both directions.

Megatron names are the unsharded (TP=1, PP=1) local-spec state-dict names; `te` is the
Transformer-Engine spelling, which is also the key Megatron's dist checkpoints store
(the local spec maps its norms onto the TE keys in `sharded_state_dict`). `{i}` is the
global layer index.

Fused layouts (verified against megatron-core 0.16.1):
- linear_qkv rows, per KV group g: [q heads of g (q_per_group * D), k_g (D), v_g (D)];
- linear_fc1 rows: [gate (F), up (F)];
- DMC decision heads (models with `dmc_decision_heads` only): Megatron [2, G, H] (split
  along axis 1 with the KV heads), HF `self_attn.dmc_decision_proj.weight` [2G, H]; rows
  0..G-1 the alpha logits of KV heads 0..G-1, rows G..2G-1 their omega logits.
Both HF and Megatron rotate-half RoPE over the same channel order, so no permutation.

Legend: H hidden, D head_dim, G KV groups, Q query heads per group, F ffn width.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from megatron_dmc.schema.llama import LlamaShape

COPY, QKV, GATE_UP, HEADS = "copy", "qkv", "gate_up", "heads"


@dataclass(frozen=True)
class Rule:
    megatron: str
    """Local-spec state-dict name (template with {i} for per-layer rules)."""
    hf: tuple[str, ...]
    """HF names fused (in this order) into the Megatron tensor."""
    fuse: str = COPY
    te: str | None = None
    """Transformer-Engine / dist-checkpoint name where it differs from `megatron`."""
    tp_axis: int | None = None
    """Axis Megatron splits across tensor-parallel ranks (None: replicated)."""
    untied_only: bool = False
    heads_only: bool = False
    """Present only in models with DMC decision heads."""

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.megatron

    @property
    def te_name(self) -> str:
        return self.te or self.megatron


_L = "model.layers.{i}."
_D = "decoder.layers.{i}."
RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), tp_axis=0),
    Rule(
        _D + "input_layernorm.weight",
        (_L + "input_layernorm.weight",),
        te=_D + "self_attention.linear_qkv.layer_norm_weight",
    ),
    Rule(
        _D + "self_attention.linear_qkv.weight",
        tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"),
        fuse=QKV,
        tp_axis=0,
    ),
    Rule(_D + "self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), tp_axis=1),
    Rule(
        _D + "pre_mlp_layernorm.weight",
        (_L + "post_attention_layernorm.weight",),
        te=_D + "mlp.linear_fc1.layer_norm_weight",
    ),
    Rule(
        _D + "mlp.linear_fc1.weight",
        (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
        fuse=GATE_UP,
        tp_axis=0,
    ),
    Rule(_D + "mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), tp_axis=1),
    Rule(
        _D + "self_attention.dmc_decision_proj.weight",
        (_L + "self_attn.dmc_decision_proj.weight",),
        fuse=HEADS,
        tp_axis=1,
        heads_only=True,
    ),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), tp_axis=0, untied_only=True),
)


@dataclass(frozen=True)
class Entry:
    """One rule instantiated at one layer (layer is None for non-layer tensors)."""

    rule: Rule
    layer: int | None

    def _fill(self, template: str) -> str:
        return template.format(i=self.layer) if self.layer is not None else template

    @property
    def megatron(self) -> str:
        return self._fill(self.rule.megatron)

    @property
    def te(self) -> str:
        return self._fill(self.rule.te_name)

    @property
    def hf(self) -> tuple[str, ...]:
        return tuple(self._fill(name) for name in self.rule.hf)


def entries(shape: LlamaShape, layers: Sequence[int] | None = None) -> Iterator[Entry]:
    """All tensors of the model in HF file order: embedding, layers, final norm, head."""
    rules = [r for r in RULES if _present(r, shape)]
    head = list(itertools.takewhile(lambda r: not r.per_layer, rules))
    tail = [r for r in rules[len(head) :] if not r.per_layer]
    yield from (Entry(r, None) for r in head)
    for layer in range(shape.num_hidden_layers) if layers is None else layers:
        yield from (Entry(r, layer) for r in rules if r.per_layer)
    yield from (Entry(r, None) for r in tail)


def _present(rule: Rule, shape: LlamaShape) -> bool:
    if rule.untied_only and shape.tie_word_embeddings:
        return False
    return shape.dmc_decision_heads or not rule.heads_only


def hf_shapes(entry: Entry, shape: LlamaShape) -> tuple[tuple[int, ...], ...]:
    """The HF tensor shapes the config implies for this entry."""
    h, d, f = shape.hidden_size, shape.head_dim, shape.intermediate_size
    by_name = {
        "embed_tokens": (shape.vocab_size, h),
        "lm_head": (shape.vocab_size, h),
        "norm": (h,),
        "input_layernorm": (h,),
        "post_attention_layernorm": (h,),
        "q_proj": (shape.num_attention_heads * d, h),
        "k_proj": (shape.num_key_value_heads * d, h),
        "v_proj": (shape.num_key_value_heads * d, h),
        "o_proj": (h, shape.num_attention_heads * d),
        "gate_proj": (f, h),
        "up_proj": (f, h),
        "down_proj": (h, f),
        "dmc_decision_proj": (2 * shape.num_key_value_heads, h),
    }
    return tuple(by_name[name.split(".")[-2]] for name in entry.hf)


def megatron_shape(entry: Entry, shape: LlamaShape) -> tuple[int, ...]:
    """The unsharded Megatron tensor shape (before any vocabulary padding)."""
    parts = hf_shapes(entry, shape)
    if entry.rule.fuse == COPY:
        return parts[0]
    if entry.rule.fuse == HEADS:
        return (2, shape.num_key_value_heads, shape.hidden_size)
    return (sum(p[0] for p in parts), parts[0][1])


def to_megatron(
    entry: Entry, hf_tensors: Sequence[torch.Tensor], shape: LlamaShape
) -> torch.Tensor:
    """Fuse the HF tensors of `entry` into its Megatron tensor."""
    if entry.rule.fuse == COPY:
        return hf_tensors[0]
    if entry.rule.fuse == HEADS:
        return hf_tensors[0].reshape(megatron_shape(entry, shape))
    if entry.rule.fuse == GATE_UP:
        return torch.cat(list(hf_tensors), dim=0)
    q_GQDH, k_G1DH, v_G1DH = _qkv_views(*hf_tensors, shape=shape)
    qkv_GxDH = torch.cat([q_GQDH, k_G1DH, v_G1DH], dim=1)
    return qkv_GxDH.reshape(-1, qkv_GxDH.shape[-1])


def to_hf(
    entry: Entry, megatron_tensor: torch.Tensor, shape: LlamaShape
) -> tuple[torch.Tensor, ...]:
    """Split the Megatron tensor of `entry` into its HF tensors (contiguous)."""
    if entry.rule.fuse == COPY:
        return (megatron_tensor.contiguous(),)
    if entry.rule.fuse == HEADS:
        return (megatron_tensor.reshape(hf_shapes(entry, shape)[0]).contiguous(),)
    if entry.rule.fuse == GATE_UP:
        gate_FH, up_FH = megatron_tensor.chunk(2, dim=0)
        return gate_FH.contiguous(), up_FH.contiguous()
    g, q, d = shape.num_key_value_heads, shape.queries_per_group, shape.head_dim
    qkv_GxDH = megatron_tensor.reshape(g, (q + 2) * d, megatron_tensor.shape[-1])
    q_GQDH, k_GDH, v_GDH = qkv_GxDH.split([q * d, d, d], dim=1)
    return tuple(t.reshape(-1, t.shape[-1]).contiguous() for t in (q_GQDH, k_GDH, v_GDH))


def _qkv_views(
    q_QH: torch.Tensor, k_KH: torch.Tensor, v_KH: torch.Tensor, shape: LlamaShape
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d, h = shape.num_key_value_heads, shape.head_dim, q_QH.shape[-1]
    return q_QH.reshape(g, -1, h), k_KH.reshape(g, d, h), v_KH.reshape(g, d, h)


def checkpoint_key(entry: Entry) -> str:
    """The dist-checkpoint key: TE spelling, layers stacked along a leading axis."""
    return entry.rule.te_name.replace("{i}.", "")


def entry_for_checkpoint_key(key: str, layer: int | None, shape: LlamaShape) -> Entry:
    """Inverse of `checkpoint_key`; unknown keys are a ValueError naming the key."""
    for rule in RULES:
        if rule.te_name.replace("{i}.", "") == key and rule.per_layer == (layer is not None):
            if not _present(rule, shape):
                break
            return Entry(rule, layer)
    raise ValueError(f"checkpoint key {key!r} has no HF counterpart in the Llama mapping")
