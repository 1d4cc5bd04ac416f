"""Every refusal happens before anything is written, with a message naming the cause."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_dmc.convert.commands import export_hf, import_hf
from megatron_dmc.convert.hf_io import HFCheckpoint
from megatron_dmc.convert.release import ReleaseCheckpoint
from tests.convert.helpers import edit_config, write_tiny_llama
from tests.convert.release_writer import write_release


def _refused(message: str):
    return pytest.raises(ValueError, match=re.escape(message))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("refusals") / "hf")


@pytest.fixture
def hf_copy(hf_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "hf"
    copy.mkdir()
    for path in hf_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "mistral"}, "model_type='mistral'"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"sliding_window": 4096}, "sliding_window=4096"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        (
            {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
            "'llama3' is not implemented",
        ),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear' is not implemented"),
        ({"num_key_value_heads": 4}, "num_attention_heads=6 is not a multiple of"),
        ({"intermediate_size": 81}, "model.layers.0.mlp.gate_proj.weight has shape (80, 48)"),
    ],
)
def test_config_refusals(hf_copy: Path, tmp_path: Path, changes: dict, message: str) -> None:
    edit_config(hf_copy, **changes)
    with _refused(message):
        import_hf(hf_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _rewrite_weights(hf_dir: Path, edit) -> None:
    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_unknown_tensor_refused(hf_copy: Path) -> None:
    _rewrite_weights(
        hf_copy, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(48)})
    )
    with _refused("unknown tensors") as info:
        HFCheckpoint(hf_copy)
    assert "q_proj.bias" in str(info.value)


def test_missing_tensor_refused(hf_copy: Path) -> None:
    _rewrite_weights(hf_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with _refused("tensors missing") as info:
        HFCheckpoint(hf_copy)
    assert "model.layers.1.mlp.up_proj.weight" in str(info.value)


def test_tied_config_with_lm_head_refused(hf_copy: Path) -> None:
    edit_config(hf_copy, tie_word_embeddings=True)
    with _refused("['lm_head.weight'] (not a plain Llama)"):
        HFCheckpoint(hf_copy)


def test_mixed_dtypes_refused(hf_copy: Path) -> None:
    _rewrite_weights(
        hf_copy, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].half()})
    )
    with _refused("all weights must share one of"):
        HFCheckpoint(hf_copy)


def test_bin_checkpoint_refused(hf_copy: Path) -> None:
    (hf_copy / "model.safetensors").unlink()
    with _refused("only safetensors are read"):
        HFCheckpoint(hf_copy)


def test_existing_target_refused(hf_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with _refused("exists and is not empty"):
        import_hf(hf_dir, tmp_path / "busy")


def test_parallel_size_refused(hf_dir: Path, tmp_path: Path) -> None:
    with _refused("num_attention_heads (6) is not divisible by the tensor parallel size (4)"):
        import_hf(hf_dir, tmp_path / "out", tensor_parallel=4)
    with _refused("num_hidden_layers (2) is not divisible by the pipeline parallel size (3)"):
        import_hf(hf_dir, tmp_path / "out", pipeline_parallel=3)
    assert not (tmp_path / "out").exists()


def test_export_of_a_non_checkpoint_refused(hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="not a distributed checkpoint"):
        export_hf(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def release_root(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_release(hf_dir, tmp_path_factory.mktemp("release") / "root")


def _rewrite_release(root: Path, edit) -> None:
    path = next(root.glob("iter_*/mp_rank_00/model_optim_rng.pt"))
    state = torch.load(path, weights_only=False)
    edit(state)
    torch.save(state, path)


@pytest.fixture
def release_copy(hf_dir: Path, tmp_path: Path) -> Path:
    return write_release(hf_dir, tmp_path / "root")


def test_release_legacy_names_refused(release_copy: Path) -> None:
    def to_legacy(state: dict) -> None:
        state["model"] = {"language_model.encoder." + k: v for k, v in state["model"].items()}

    _rewrite_release(release_copy, to_legacy)
    with _refused("legacy Megatron-LM names"):
        ReleaseCheckpoint(release_copy)


def test_release_non_llama_args_refused(release_copy: Path) -> None:
    _rewrite_release(release_copy, lambda s: setattr(s["args"], "swiglu", False))
    with _refused("args swiglu=False"):
        ReleaseCheckpoint(release_copy)


def test_release_unknown_tensor_refused(release_copy: Path) -> None:
    _rewrite_release(
        release_copy,
        lambda s: s["model"].update({"decoder.layers.0.mlp.linear_fc1.bias": torch.zeros(4)}),
    )
    with _refused("['decoder.layers.0.mlp.linear_fc1.bias']"):
        ReleaseCheckpoint(release_copy)


def test_release_shape_contradicting_args_refused(release_copy: Path) -> None:
    _rewrite_release(release_copy, lambda s: setattr(s["args"], "ffn_hidden_size", 64))
    with _refused("decoder.layers.0.mlp.linear_fc1.weight merges to shape (160, 48)"):
        ReleaseCheckpoint(release_copy)


def test_release_pipeline_parallel_refused(release_copy: Path) -> None:
    iteration = next(release_copy.glob("iter_*"))
    (iteration / "mp_rank_00").rename(iteration / "mp_rank_00_000")
    with _refused("pipeline-parallel (mp_rank_00_000)"):
        ReleaseCheckpoint(release_copy)


def test_release_pickle_needs_trust(release_copy: Path) -> None:
    _rewrite_release(release_copy, lambda s: s.update(rng_state=[{"random_rng_state": object()}]))
    with _refused("pass --trust-checkpoint"):
        ReleaseCheckpoint(release_copy)
    assert ReleaseCheckpoint(release_copy, trust_pickle=True).dmc["target_cr"] == 4.0


def test_config_file_missing(tmp_path: Path) -> None:
    with _refused("config.json not found"):
        HFCheckpoint(tmp_path)
