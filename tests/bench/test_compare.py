"""The side-by-side decode comparison (bench/smollm2.py) and the job's headline section."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_dmc.bench.engines import load_transformers
from megatron_dmc.bench.smollm2 import Comparison, compare, ratios
from megatron_dmc.inference.loading import load_model
from megatron_dmc.pipeline.decode import headline_section, run_headline
from megatron_dmc.pipeline.preset import DecodeSettings
from megatron_dmc.schema.llama import hf_config_from_shape
from tests.inference.model_helpers import tiny_model


def _save(model, path, dmc: bool):
    from safetensors.torch import save_file

    path.mkdir()
    config = hf_config_from_shape(model.shape)
    if dmc:
        config.update(dmc_window_size=12, dmc_init_val=5.0, model_type="llama_dmc",
                      architectures=["LlamaDMCForCausalLM"])  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny model whose decisions merge most tokens, as a plain and a DMC HF directory."""
    root = tmp_path_factory.mktemp("models")
    model = tiny_model(seed=1, decision_scale=40.0)
    return _save(model, root / "vanilla", False), _save(model, root / "dmc", True)


def test_compare_rows_fit_the_budget(dirs):
    torch.set_num_threads(1)
    vanilla_dir, dmc_dir = dirs
    vanilla = load_model(vanilla_dir, mode="vanilla")
    dmc = {"DMC trained decisions": load_model(dmc_dir, mode="dmc")}
    prompt_1T = torch.randint(0, 97, (1, 240), generator=torch.Generator().manual_seed(0))
    settings = Comparison(batch=4, steps=2, page_size=4, prefill_chunk=64)
    rows = compare(vanilla, dmc, load_transformers(str(vanilla_dir)), prompt_1T, settings,
                   log=lambda _: None)  # fmt: skip
    by = {r["engine"]: r for r in rows}
    assert list(by) == ["transformers dense", "ours vanilla",
                        "ours DMC trained decisions, equal batch",
                        "ours DMC trained decisions, equal KV memory"]  # fmt: skip
    wide = by["ours DMC trained decisions, equal KV memory"]
    assert wide["batch"] > settings.batch and wide["kv_mib"] <= wide["budget_mib"]
    assert by["ours DMC trained decisions, equal batch"]["kv_mib"] < by["ours vanilla"]["kv_mib"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert any("transformers dense per step" in line for line in ratios(rows, None))


def test_transformers_engine_and_ours_agree_on_greedy_tokens(dirs):
    from megatron_dmc.bench.engines import transformers_dense
    from megatron_dmc.bench.smollm2 import ours_filled

    vanilla_dir, _ = dirs
    prompt_1T = torch.randint(0, 97, (1, 50), generator=torch.Generator().manual_seed(2))
    settings = Comparison(batch=2, steps=3, page_size=4)
    ours = ours_filled(load_model(vanilla_dir, mode="vanilla"), "v", 2, prompt_1T, settings)
    hf = transformers_dense(load_transformers(str(vanilla_dir)), prompt_1T, 2)
    hf_run = hf.step.__self__
    assert torch.equal(ours.next_B, hf_run.next_B)
    for _ in range(3):
        ours.step("paged")
        hf.step()
        assert torch.equal(ours.next_B, hf_run.next_B)


def test_headline_writes_json_plot_and_report_section(dirs, tmp_path):
    vanilla_dir, dmc_dir = dirs
    settings = DecodeSettings(page_size=4, prefill_chunk=32, headline_contexts=[60, 1000],
                              headline_batch=2, headline_steps=1)  # fmt: skip
    tokens = torch.randint(0, 97, (2000,), generator=torch.Generator().manual_seed(3))
    out = tmp_path / "job"
    rows = run_headline(str(vanilla_dir), {"dmc 2x": dmc_dir}, tokens, settings, out / "decode")
    assert sorted({r["context"] for r in rows}) == [60, 256 - 1 - 2]
    assert (out / "decode" / "headline.png").read_bytes().startswith(b"\x89PNG")
    section = "\n".join(headline_section(out))
    assert "equal KV memory" in section and "| 60 | transformers dense | 2 |" in section
    assert headline_section(tmp_path / "nothing") == []
