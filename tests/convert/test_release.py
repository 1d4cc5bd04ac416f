"""Import of Megatron-LM torch-format checkpoints in the NVIDIA DMC release layout."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_dmc.convert.cli import main
from megatron_dmc.convert.commands import compare_hf_dirs, export_hf, import_release
from megatron_dmc.schema.checkpoint import read_metadata
from tests.convert.helpers import write_tiny_llama
from tests.convert.release_writer import write_release


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("release_src") / "hf", seed=7)


def test_tp2_release_straight_to_dmc_hf(hf_dir: Path, tmp_path: Path) -> None:
    root = write_release(hf_dir, tmp_path / "release", tp=2, padded_vocab=128)
    out = tmp_path / "dmc"
    main(
        [
            "import-release",
            "--load",
            str(root),
            "--hf-dir",
            str(out),
            "--vocab-size",
            "96",
            "--tokenizer-dir",
            str(hf_dir),
        ]
    )
    assert len(compare_hf_dirs(hf_dir, out)) == 21
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama_dmc"
    assert (config["dmc_target_cr"], config["dmc_window_size"]) == (4.0, 12)
    assert config["rope_parameters"]["rope_theta"] == 50000.0
    assert (out / "modeling_llama_dmc.py").is_file() and (out / "tokenizer_config.json").is_file()


def test_release_to_megatron_keeps_dmc_metadata(hf_dir: Path, tmp_path: Path) -> None:
    root = write_release(hf_dir, tmp_path / "release", tp=1, padded_vocab=128)
    meg = import_release(root, tmp_path / "meg", vocab_size=96)
    assert read_metadata(meg)["dmc"]["target_cr"] == 4.0
    out = export_hf(meg, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DMCLlamaForCausalLM"]
    assert len(compare_hf_dirs(hf_dir, out)) == 21


def test_padded_vocabulary_is_kept_without_a_vocab_size(hf_dir: Path, tmp_path: Path) -> None:
    root = write_release(hf_dir, tmp_path / "release", tp=2, padded_vocab=128)
    out = tmp_path / "padded"
    main(["import-release", "--load", str(root), "--hf-dir", str(out)])
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        embedding = handle.get_tensor("model.embed_tokens.weight")
    with safe_open(hf_dir / "model.safetensors", framework="pt") as handle:
        original = handle.get_tensor("model.embed_tokens.weight")
    assert embedding.shape == (128, 48) and torch.equal(embedding[:96], original)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 128
