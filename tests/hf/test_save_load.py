"""Exported DMC directories load offline, with the copied code alone or through the registry."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from megatron_dmc.hf import (
    AUTO_MAP,
    CODE_FILES,
    DMCLlamaForCausalLM,
    add_remote_code,
    save_pretrained_with_code,
)
from tests.hf.helpers import (
    dmc_model,
    fire_decisions,
    fire_heads,
    reference_llama,
    relative_error,
)

IDS = torch.randint(3, 101, (2, 21), generator=torch.Generator().manual_seed(9))

REMOTE_LOAD = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "megatron_dmc":
                raise ImportError("megatron_dmc is blocked in this test")
    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoModelForCausalLM
    ids_path, *pairs = sys.argv[1:]
    ids = torch.load(ids_path)
    for export_dir, out_path in zip(pairs[::2], pairs[1::2]):
        model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
        sequences = model.generate(ids, max_new_tokens=6, do_sample=False)
        result = {"class": type(model).__name__, "logits": logits, "sequences": sequences}
        torch.save(result, out_path)
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = fire_decisions(dmc_model(dmc_target_cr=4.0))
    export_dir = save_pretrained_with_code(model, tmp_path_factory.mktemp("export") / "dmc")
    return model, export_dir


def test_export_carries_code_and_auto_map(exported):
    _, export_dir = exported
    config = json.loads((export_dir / "config.json").read_text())
    assert config["model_type"] == "llama_dmc"
    assert config["auto_map"] == AUTO_MAP
    assert config["dmc_window_size"] == 12 and config["dmc_target_cr"] == 4.0
    assert all((export_dir / name).is_file() for name in CODE_FILES)


def test_remote_code_loads_offline_without_megatron_dmc(exported, tmp_path):
    """The paper's model, and one with decision heads and a merge delay, in one process."""
    model, export_dir = exported
    heads_delay = fire_heads(dmc_model(dmc_decision_source="heads", dmc_merge_delay=3))
    heads_dir = save_pretrained_with_code(heads_delay, tmp_path / "heads_delay")
    torch.save(IDS, tmp_path / "ids.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    pairs = [str(export_dir), str(tmp_path / "out.pt"), str(heads_dir), str(tmp_path / "hd.pt")]
    script = [sys.executable, "-c", REMOTE_LOAD, str(tmp_path / "ids.pt"), *pairs]
    subprocess.run(script, check=True, env=env, cwd=tmp_path, timeout=300)
    for expected_model, out in ((model, "out.pt"), (heads_delay, "hd.pt")):
        result = torch.load(tmp_path / out)
        with torch.no_grad():
            expected = expected_model(IDS, use_cache=False).logits
        assert result["class"] == "DMCLlamaForCausalLM"
        assert relative_error(result["logits"], expected) <= 1e-5
        sequences = expected_model.generate(IDS, max_new_tokens=6, do_sample=False)
        assert torch.equal(result["sequences"], sequences)
    config = json.loads((heads_dir / "config.json").read_text())
    assert config["dmc_decision_source"] == "heads" and config["dmc_merge_delay"] == 3


def test_registered_auto_classes_load_the_export(exported):
    model, export_dir = exported
    loaded = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    assert isinstance(loaded, DMCLlamaForCausalLM)
    with torch.no_grad():
        assert torch.equal(loaded(IDS, use_cache=False).logits, model(IDS, use_cache=False).logits)


def test_plain_llama_checkpoint_loads_into_the_dmc_model(tmp_path):
    torch.manual_seed(0)
    llama_config = LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(llama_config).save_pretrained(tmp_path)
    model, info = DMCLlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.model_type == "llama_dmc" and model.config.dmc_window_size == 12
    reference = reference_llama(model.eval(), "ops")
    with torch.no_grad():
        assert relative_error(model(IDS, use_cache=False).logits, reference(IDS).logits) <= 1e-5


def test_add_remote_code_refuses_a_plain_llama_directory(tmp_path):
    LlamaConfig(hidden_size=64, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'llama'"):
        add_remote_code(tmp_path)
