"""The transformers DMC Llama equals a Llama whose attention is megatron_dmc.ops, in fp32."""

import pytest
import torch

from megatron_dmc.hf import modeling_llama_dmc as hf_dmc
from megatron_dmc.ops import DMCConfig, dmc_self_attention, rope_cos_sin
from tests.hf.helpers import (
    dmc_model,
    fire_decisions,
    reference_llama,
    relative_error,
    zero_decision_rows,
)
from tests.ops.helpers import random_qkv

SHAPES = [
    dict(num_attention_heads=4, num_key_value_heads=2),
    dict(num_attention_heads=3, num_key_value_heads=3, hidden_size=48),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", [12, 3])
def test_logits_match_ops_reference_with_appends_and_merges(shape, window):
    model = fire_decisions(dmc_model(dmc_window_size=window, **shape))
    reference = reference_llama(model, "ops")
    ids = torch.randint(3, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        expected = reference(ids).logits
    alpha = torch.cat(
        [layer.self_attn.decisions.alpha_BGT.flatten() for layer in reference.model.layers]
    )
    assert 0.15 < float(alpha.mean()) < 0.6, "both appends and merges must occur"
    assert relative_error(logits, expected) <= 1e-5


def test_zeroed_decision_channel_equals_stage1_model():
    model = zero_decision_rows(dmc_model())
    stage1 = reference_llama(model, "stage1")
    ids = torch.randint(3, 101, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_error(model(ids, use_cache=False).logits, stage1(ids).logits) <= 1e-5


@pytest.mark.parametrize("pattern", ["random", "long_runs", "all_merge"])
@pytest.mark.parametrize("training", [False, True])
def test_inlined_maths_equals_ops(pattern, training):
    q, k, v, _, _, _ = random_qkv(2, 6, 2, 31, 8, pattern, seed=3, dtype=torch.float32)
    cos, sin = rope_cos_sin(torch.arange(31), 8)
    config = hf_dmc.LlamaDMCConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=2)
    expected, decisions = dmc_self_attention(
        q, k, v, cos, sin, DMCConfig(), training, torch.Generator().manual_seed(4)
    )
    got = hf_dmc.dmc_parallel_attention(
        q, k, v, cos, sin, config, training, generator=torch.Generator().manual_seed(4)
    )
    assert torch.equal(got.alpha_BGT, decisions.alpha_BGT)
    assert relative_error(got.out_BHTD, expected) <= 1e-5
