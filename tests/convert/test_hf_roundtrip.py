"""HF -> Megatron -> HF in one process: bitwise round trips, sharding, DMC export, CLI."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from megatron_dmc.convert.cli import main
from megatron_dmc.convert.commands import compare_hf_dirs, export_hf, import_hf
from megatron_dmc.convert.megatron_io import MegatronCheckpoint
from megatron_dmc.schema.checkpoint import read_metadata
from tests.convert.helpers import write_tiny_llama

SMOLLM_LIKE = dict(
    tie_word_embeddings=True,
    num_attention_heads=3,
    num_key_value_heads=1,
    head_dim=16,
    dtype="bfloat16",
)


def test_sharded_roundtrip_is_bitwise(tmp_path: Path) -> None:
    hf = write_tiny_llama(tmp_path / "hf", max_shard_size="20KB")
    meg = import_hf(hf, tmp_path / "meg")
    assert (meg / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert (meg / "hf_assets" / "tokenizer_config.json").is_file()
    out = export_hf(meg, tmp_path / "out", max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert len(compare_hf_dirs(hf, out)) == 21
    assert (out / "tokenizer_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert not list(tmp_path.glob(".*partial"))


def test_tied_bf16_roundtrip_keeps_dtype_and_has_no_head(tmp_path: Path) -> None:
    model_kwargs = dict(SMOLLM_LIKE)
    dtype = model_kwargs.pop("dtype")
    hf = write_tiny_llama(tmp_path / "hf", **model_kwargs)
    _cast_checkpoint(hf, dtype)
    meg = import_hf(hf, tmp_path / "meg")
    assert read_metadata(meg)["llama"]["dtype"] == "bfloat16"
    with MegatronCheckpoint(meg) as ckpt:
        assert "output_layer.weight" not in ckpt._tensors
        assert ckpt._tensors["embedding.word_embeddings.weight"].dtype == torch.bfloat16
    out = export_hf(meg, tmp_path / "out")
    assert len(compare_hf_dirs(hf, out)) == 20


def _cast_checkpoint(hf_dir: Path, dtype: str) -> None:
    path = hf_dir / "model.safetensors"
    tensors = {k: v.to(getattr(torch, dtype)) for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


def test_dmc_export_config_and_remote_code(tmp_path: Path) -> None:
    hf = write_tiny_llama(tmp_path / "hf")
    meg = import_hf(hf, tmp_path / "meg")
    out = export_hf(meg, tmp_path / "dmc", dmc=True)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama_dmc"
    assert config["architectures"] == ["DMCLlamaForCausalLM"]
    assert (config["dmc_window_size"], config["dmc_init_val"]) == (12, 5.0)
    assert config["dmc_decision_channel"] == -1
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llama_dmc.DMCLlamaForCausalLM"
    assert (out / "modeling_llama_dmc.py").is_file()
    assert (out / "configuration_llama_dmc.py").is_file()
    loaded = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert loaded.model_type == "llama_dmc" and loaded.dmc_window_size == 12
    assert len(compare_hf_dirs(hf, out)) == 21
    # A DMC export imports back as a DMC checkpoint and exports as DMC by default.
    meg2 = import_hf(out, tmp_path / "meg2")
    assert read_metadata(meg2)["dmc"]["window_size"] == 12
    again = export_hf(meg2, tmp_path / "dmc2")
    assert json.loads((again / "config.json").read_text())["model_type"] == "llama_dmc"


def test_cli_roundtrip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = write_tiny_llama(tmp_path / "hf")
    main(["roundtrip", "--hf-dir", str(hf), "--work-dir", str(tmp_path)])
    assert "21 tensors bitwise equal" in capsys.readouterr().out


def test_checkpoint_without_metadata_exports_with_hf_config(tmp_path: Path) -> None:
    hf = write_tiny_llama(tmp_path / "hf")
    meg = import_hf(hf, tmp_path / "meg")
    common = meg / "release" / "common.pt"
    state = torch.load(common, weights_only=False)
    del state["megatron_dmc"]
    torch.save(state, common)
    with pytest.raises(ValueError, match="pass the model shape"):
        export_hf(meg, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    main(
        [
            "export-hf",
            "--load",
            str(meg),
            "--hf-dir",
            str(tmp_path / "out"),
            "--hf-config",
            str(hf / "config.json"),
        ]
    )
    assert len(compare_hf_dirs(hf, tmp_path / "out")) == 21
