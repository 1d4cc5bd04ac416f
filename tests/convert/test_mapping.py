"""The mapping table: fused layouts, entry enumeration, checkpoint keys (no Megatron run)."""

import re

import pytest
import torch

from megatron_dmc.convert.mapping import (
    QKV,
    checkpoint_key,
    entries,
    entry_for_checkpoint_key,
    hf_shapes,
    megatron_shape,
    to_hf,
    to_megatron,
)
from megatron_dmc.schema.llama import LlamaShape


def _shape(heads: int, groups: int, tied: bool = False) -> LlamaShape:
    return LlamaShape(
        vocab_size=32,
        hidden_size=12,
        intermediate_size=20,
        num_hidden_layers=3,
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=4,
        tie_word_embeddings=tied,
    )


@pytest.mark.parametrize(("heads", "groups"), [(3, 3), (6, 2), (4, 1)])
def test_every_entry_fuses_and_splits_back_exactly(heads: int, groups: int) -> None:
    shape = _shape(heads, groups)
    for entry in entries(shape):
        hf = [torch.randn(s) for s in hf_shapes(entry, shape)]
        fused = to_megatron(entry, hf, shape)
        assert tuple(fused.shape) == megatron_shape(entry, shape)
        for a, b in zip(hf, to_hf(entry, fused, shape)):
            assert torch.equal(a, b)


def test_qkv_rows_are_grouped_q_then_k_then_v() -> None:
    shape = _shape(heads=6, groups=2)  # 3 query heads per KV group, head_dim 4
    entry = next(e for e in entries(shape) if e.rule.fuse == QKV)
    d, h = 4, 12
    q = torch.arange(6).repeat_interleave(d)[:, None].expand(-1, h).float()
    k = 100 + torch.arange(2).repeat_interleave(d)[:, None].expand(-1, h).float()
    v = 200 + torch.arange(2).repeat_interleave(d)[:, None].expand(-1, h).float()
    head_ids = to_megatron(entry, [q, k, v], shape)[::d, 0].tolist()
    assert head_ids == [0, 1, 2, 100, 200, 3, 4, 5, 101, 201]


def test_gate_then_up_in_fc1() -> None:
    shape = _shape(3, 3)
    entry = next(e for e in entries(shape) if e.megatron.endswith("linear_fc1.weight"))
    gate, up = torch.zeros(20, 12), torch.ones(20, 12)
    fused = to_megatron(entry, [gate, up], shape)
    assert fused[:20].eq(0).all() and fused[20:].eq(1).all()


@pytest.mark.parametrize("tied", [False, True])
def test_entries_cover_the_model_once(tied: bool) -> None:
    shape = _shape(3, 3, tied=tied)
    found = list(entries(shape))
    assert len(found) == 2 + 6 * 3 + (0 if tied else 1)
    hf_names = [n for e in found for n in e.hf]
    assert len(hf_names) == len(set(hf_names)) == 2 + 9 * 3 + (0 if tied else 1)
    assert ("lm_head.weight" in hf_names) is not tied


def test_checkpoint_keys_use_te_names_and_invert() -> None:
    shape = _shape(3, 3)
    for entry in entries(shape):
        key = checkpoint_key(entry)
        assert "{i}" not in key and ".0." not in key
        assert entry_for_checkpoint_key(key, entry.layer, shape) == entry
    norm = next(e for e in entries(shape) if e.megatron.endswith("1.input_layernorm.weight"))
    assert checkpoint_key(norm) == "decoder.layers.self_attention.linear_qkv.layer_norm_weight"


def test_unknown_checkpoint_key_is_named() -> None:
    with pytest.raises(ValueError, match=re.escape("decoder.layers.mlp.router.weight")):
        entry_for_checkpoint_key("decoder.layers.mlp.router.weight", 0, _shape(3, 3))
    with pytest.raises(ValueError, match=re.escape("output_layer.weight")):
        entry_for_checkpoint_key("output_layer.weight", None, _shape(3, 3, tied=True))
