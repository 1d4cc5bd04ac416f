"""Converters with DMC decision heads: mapping, bitwise round trips at TP=1 and TP=2."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_dmc.convert.commands import compare_hf_dirs, export_hf, import_hf, reshard
from megatron_dmc.convert.mapping import entries, hf_shapes, to_hf, to_megatron
from megatron_dmc.convert.megatron_io import MegatronCheckpoint
from megatron_dmc.schema.checkpoint import read_metadata
from megatron_dmc.schema.llama import llama_shape_from_hf
from tests.convert.helpers import TINY, edit_config, tiny_config, write_tiny_llama

HEADS_NAME = "model.layers.{i}.self_attn.dmc_decision_proj.weight"


def write_heads_llama(out_dir: Path, seed: int = 0, merge_delay: int = 3) -> Path:
    """A tiny DMC Llama with random decision heads, as a heads-mode export looks."""
    write_tiny_llama(out_dir, seed=seed)
    path = out_dir / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(seed + 100)
    rows, hidden = 2 * TINY["num_key_value_heads"], TINY["hidden_size"]
    for i in range(TINY["num_hidden_layers"]):
        tensors[HEADS_NAME.format(i=i)] = torch.randn(rows, hidden, generator=gen)
    save_file(tensors, path, metadata={"format": "pt"})
    edit_config(
        out_dir,
        model_type="llama_dmc",
        dmc_decision_source="heads",
        dmc_merge_delay=merge_delay,
        dmc_window_size=12,
        dmc_init_val=5.0,
    )
    return out_dir


def _shape(heads: bool):
    config = tiny_config().to_dict()
    if heads:
        config.update(model_type="llama_dmc", dmc_decision_source="heads")
    return llama_shape_from_hf(config)


def test_heads_entry_only_in_heads_models_and_splits_back_exactly() -> None:
    plain = [e.hf for e in entries(_shape(False))]
    with_heads = list(entries(_shape(True)))
    heads = [e for e in with_heads if e.rule.heads_only]
    assert len(with_heads) == len(plain) + 2 and all(e.hf not in plain for e in heads)
    shape = _shape(True)
    hf_tensor = torch.randn(*hf_shapes(heads[0], shape)[0])
    megatron = to_megatron(heads[0], [hf_tensor], shape)
    assert megatron.shape == (2, 2, 48)
    assert torch.equal(megatron[0, 1], hf_tensor[1]) and torch.equal(megatron[1, 0], hf_tensor[2])
    assert torch.equal(to_hf(heads[0], megatron, shape)[0], hf_tensor)


def test_bad_decision_source_in_config_is_refused() -> None:
    config = tiny_config().to_dict()
    config.update(model_type="llama_dmc", dmc_decision_source="neuron")
    with pytest.raises(ValueError, match="dmc_decision_source"):
        llama_shape_from_hf(config)


def test_heads_roundtrip_is_bitwise_and_keeps_the_dmc_fields(tmp_path: Path) -> None:
    hf = write_heads_llama(tmp_path / "hf")
    meg = import_hf(hf, tmp_path / "meg")
    metadata = read_metadata(meg)
    assert metadata["llama"]["dmc_decision_heads"] is True
    assert (metadata["dmc"]["decision_source"], metadata["dmc"]["merge_delay"]) == ("heads", 3)
    with MegatronCheckpoint(meg) as ckpt:
        stored = ckpt._tensors["decoder.layers.self_attention.dmc_decision_proj.weight"]
        assert tuple(stored.global_shape) == (2, 2, 2, 48)
    out = export_hf(meg, tmp_path / "out")
    assert len(compare_hf_dirs(hf, out)) == 23
    config = (out / "config.json").read_text()
    assert '"dmc_decision_source": "heads"' in config and '"dmc_merge_delay": 3' in config
    with pytest.raises(ValueError, match="exports only as a DMC Llama"):
        export_hf(meg, tmp_path / "plain", dmc=False)


def test_calibrated_threshold_survives_import_and_export(tmp_path: Path) -> None:
    hf = write_heads_llama(tmp_path / "hf")
    edit_config(hf, dmc_decision_threshold=1.75)
    meg = import_hf(hf, tmp_path / "meg")
    assert read_metadata(meg)["dmc"]["decision_threshold"] == 1.75
    config = (export_hf(meg, tmp_path / "out") / "config.json").read_text()
    assert '"dmc_decision_threshold": 1.75' in config


def test_channel_export_writes_the_paper_defaults(tmp_path: Path) -> None:
    hf = write_tiny_llama(tmp_path / "hf")
    out = export_hf(import_hf(hf, tmp_path / "meg"), tmp_path / "dmc", dmc=True)
    config = (out / "config.json").read_text()
    assert '"dmc_decision_source": "channel"' in config and '"dmc_merge_delay": 0' in config
    assert '"dmc_decision_threshold": 0.0' in config


@pytest.mark.slow
@pytest.mark.dist
def test_heads_tp2_import_reshard_export_is_bitwise(tmp_path: Path) -> None:
    hf = write_heads_llama(tmp_path / "hf", seed=4)
    tp2 = import_hf(hf, tmp_path / "tp2", tensor_parallel=2)
    tp1 = reshard(tp2, tmp_path / "tp1")
    for ckpt in (tp2, tp1):
        out = export_hf(ckpt, tmp_path / f"out_{ckpt.name}")
        assert len(compare_hf_dirs(hf, out)) == 23


def test_megatron_heads_model_matches_the_exported_hf_model(tmp_path: Path) -> None:
    """The same checkpoint through the Megatron layer and the transformers DMC model:
    decision heads with random weights (mixed decisions) and a merge delay, eval mode."""
    from megatron_dmc.convert.megatron_io import load_into_model
    from megatron_dmc.distributed import destroy_distributed, initialize_distributed
    from megatron_dmc.hf import DMCLlamaForCausalLM
    from megatron_dmc.model import build_model
    from megatron_dmc.ops import DMCConfig
    from megatron_dmc.schema.llama import LlamaShape

    hf = write_heads_llama(tmp_path / "hf", seed=2, merge_delay=3)
    tensors = load_file(hf / "model.safetensors")  # heads scaled for mixed decisions
    tensors = {k: v * 0.1 if "decision" in k else v for k, v in tensors.items()}
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    meg = import_hf(hf, tmp_path / "meg")
    tokens_BT = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    initialize_distributed(1, 1)
    try:
        shape = LlamaShape.from_dict(read_metadata(meg)["llama"])
        config = DMCConfig(decision_source="heads", merge_delay=3)
        model = build_model(shape, "dmc", config).eval()
        load_into_model(model, meg)
        positions_BT = torch.arange(tokens_BT.shape[1]).expand_as(tokens_BT)
        with torch.no_grad():
            megatron_BTV, sums = model(tokens_BT, positions_BT, None)
    finally:
        destroy_distributed()
    merged = sums.alpha_sum_B / sums.count
    assert bool(((merged > 0.1) & (merged < 0.9)).all()), f"need mixed decisions, got {merged}"
    reference = DMCLlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_BTV = reference(tokens_BT).logits
    error = (megatron_BTV - hf_BTV).abs().max() / hf_BTV.abs().max()
    assert error <= 1e-5, f"relative error {error:.2e}"
