"""GQA conversion: pooling heads that are already equal within a group changes nothing."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_dmc.eval.gqa import convert_to_gqa, pool_kv_heads
from tests.eval.helpers import tiny_llama


def _duplicate_within_groups(model, groups: int) -> None:
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                heads = proj.weight.view(groups, -1, 16, 64)
                heads[:] = heads[:, :1]


def test_pooling_identical_heads_keeps_logits(tmp_path):
    model = tiny_llama(kv_heads=4)
    _duplicate_within_groups(model, groups=2)
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    convert_to_gqa(tmp_path / "src", tmp_path / "dst", num_kv_heads=2)
    pooled = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert pooled.config.num_key_value_heads == 2
    assert pooled.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)
    assert (tmp_path / "dst" / "tokenizer_config.json").is_file()
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(pooled(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_pooling_is_the_group_mean():
    model = tiny_llama(kv_heads=4)
    state = pool_kv_heads(model.state_dict(), model.config, 1)
    key = "model.layers.1.self_attn.v_proj.weight"
    expected = model.state_dict()[key].view(4, 16, 64).mean(0)
    torch.testing.assert_close(state[key], expected)


def test_uneven_groups_are_rejected():
    model = tiny_llama(kv_heads=4)
    with pytest.raises(ValueError, match="divisor"):
        pool_kv_heads(model.state_dict(), model.config, 3)
