"""A decision-heads model with a merge delay goes HF -> Megatron -> HF bitwise through the
converter and loads back into the transformers DMC model."""

import json

import pytest
import torch

from megatron_dmc.convert.commands import export_hf, import_hf
from megatron_dmc.hf import DMCLlamaForCausalLM, save_pretrained_with_code
from tests.hf.helpers import dmc_model, fire_heads


@pytest.mark.slow
def test_heads_and_delay_survive_the_converter(tmp_path):
    model = fire_heads(dmc_model(dmc_decision_source="heads", dmc_merge_delay=3))
    source = save_pretrained_with_code(model, tmp_path / "hf")
    out = export_hf(import_hf(source, tmp_path / "megatron"), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert (config["dmc_decision_source"], config["dmc_merge_delay"]) == ("heads", 3)
    loaded = DMCLlamaForCausalLM.from_pretrained(out).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.randint(3, 101, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
