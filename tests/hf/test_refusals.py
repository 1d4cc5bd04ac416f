"""What the DMC Llama does not support is refused with a message that says what to do."""

import pytest
import torch
from transformers import DynamicCache

from megatron_dmc.hf import DMCCache
from tests.hf.helpers import dmc_model, tiny_config

IDS = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(8))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(dmc_decision_channel=0), "dmc_decision_channel=-1"),
        (dict(dmc_window_size=0), "dmc_window_size must be >= 1"),
        (dict(dmc_target_cr=0.5), "dmc_target_cr must be >= 1"),
        (dict(dmc_layer_head_cr=[[2.0, 2.0]]), "num_hidden_layers lists of num_key_value_heads"),
    ],
)
def test_config_refusals(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_accepts_a_trained_cr_table():
    config = tiny_config(dmc_layer_head_cr=[[2.0, 4.0], [3.5, 8.0]], dmc_target_cr=4)
    assert config.to_dict()["dmc_layer_head_cr"] == [[2.0, 4.0], [3.5, 8.0]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(cache=DynamicCache()), "need a DMCCache"),
        (dict(attention_mask=torch.ones(2, 1, 9, 9)), "2D 0/1 attention_mask"),
        (
            dict(attention_mask=torch.tensor([[1] * 9, [1, 1, 0, 1, 1, 1, 1, 1, 1]])),
            "zeros then ones",
        ),
        (
            dict(attention_mask=torch.tensor([[1] * 9, [1] * 7 + [0, 0]]), use_cache=True),
            "left padding only",
        ),
    ],
)
def test_forward_refusals(kwargs, message):
    with pytest.raises(ValueError, match=message), torch.no_grad():
        dmc_model()(IDS, **kwargs)


def test_right_padding_is_fine_without_a_cache():
    mask = torch.tensor([[1] * 9, [1] * 7 + [0, 0]])
    model = dmc_model()
    with torch.no_grad():
        padded = model(IDS, attention_mask=mask, use_cache=False).logits
        unpadded = model(IDS[1:, :7], use_cache=False).logits
    torch.testing.assert_close(padded[1, :7], unpadded[0], rtol=1e-5, atol=1e-6)


def test_training_mode_refuses_a_cache():
    model = dmc_model().train()
    with pytest.raises(ValueError, match=r"model.eval\(\)"):
        model(IDS, cache=DMCCache(model.config))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_beams=2), "num_beams=1"),
        (dict(cache_implementation="static"), "leave cache_implementation unset"),
    ],
)
def test_generate_refusals(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dmc_model().generate(IDS, max_new_tokens=2, **kwargs)


def test_cache_refuses_page_size_and_cropping():
    model = dmc_model()
    with pytest.raises(ValueError, match="page_size"):
        DMCCache(model.config, page_size=0)
    with torch.no_grad():
        cache = model(IDS, use_cache=True).cache
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)
