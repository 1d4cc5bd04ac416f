"""Loading HF directories: DMC export, plain Llama (vanilla), and refused checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from megatron_dmc.inference.loading import load_model
from megatron_dmc.schema.llama import hf_config_from_shape
from tests.inference.model_helpers import tiny_model

DMC_FIELDS = {"dmc_window_size": 12, "dmc_init_val": 5.0}


def _save(model, path, dmc_fields=None, model_type=None):
    path.mkdir()
    config = hf_config_from_shape(model.shape)
    if dmc_fields is not None:
        config.update(dmc_fields, model_type="llama_dmc", architectures=["LlamaDMCForCausalLM"])
    if model_type:
        config["model_type"] = model_type
    (path / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors")
    )
    return path


def test_dmc_export_loads_in_dmc_mode(tmp_path):
    model = tiny_model()
    loaded = load_model(_save(model, tmp_path / "m", DMC_FIELDS))
    assert loaded.dmc is not None and loaded.dmc.window_size == 12
    tokens = torch.randint(0, 97, (1, 20))
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


def test_plain_llama_runs_vanilla_and_refuses_dmc(tmp_path):
    path = _save(tiny_model(dmc=False), tmp_path / "m")
    assert load_model(path).dmc is None
    with pytest.raises(ValueError, match="no DMC fields"):
        load_model(path, mode="dmc")


def test_llama_dmc_without_fields_is_refused(tmp_path):
    path = _save(tiny_model(), tmp_path / "m", model_type="llama_dmc")
    with pytest.raises(ValueError, match="lacks dmc_window_size"):
        load_model(path)


def test_unknown_weight_is_refused(tmp_path):
    path = _save(tiny_model(), tmp_path / "m", DMC_FIELDS)
    save_file({"model.extra.weight": torch.zeros(2)}, str(path / "extra.safetensors"))
    with pytest.raises(ValueError, match="unknown"):
        load_model(path)


def test_vanilla_model_matches_transformers_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(dmc=False)
    config = transformers.LlamaConfig(**hf_config_from_shape(model.shape))
    reference = transformers.LlamaForCausalLM(config).eval()
    report = reference.load_state_dict(model.state_dict(), strict=False)
    assert not report.unexpected_keys
    assert all("rotary" in k for k in report.missing_keys)
    tokens = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        expected = reference(tokens).logits
    actual = model(tokens)
    assert float((actual - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_generate_cli_prints_tokens_and_compression_ratio(tmp_path, capsys):
    from megatron_dmc.generate import main

    path = _save(tiny_model(), tmp_path / "m", DMC_FIELDS)
    main(
        [
            "--model-dir",
            str(path),
            "--token-ids",
            "1,2,3,4",
            "--token-ids",
            "9,8",
            "--max-new-tokens",
            "5",
        ]
    )
    out = capsys.readouterr().out
    assert out.count("(length)") == 2
    assert "achieved compression ratio:" in out and "decisions from the model" in out
    main(
        [
            "--model-dir",
            str(path),
            "--token-ids",
            "1,2,3",
            "--forced-cr",
            "4",
            "--max-new-tokens",
            "3",
        ]
    )
    assert "FORCED-RATE decisions (CR 4" in capsys.readouterr().out
