"""--kv-method dms end to end: distilled retrofit of the decision heads on the shared trainer,
export, then the export loads with trust_remote_code and in the paged engine, which agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_dms_trains_exports_and_loads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from megatron_dmc.convert.commands import export_hf
    from megatron_dmc.inference.loading import load_model
    from tests.training.helpers import TINY_SHARED, metrics, train

    save = tmp_path / "run"
    flags = ["--kv-method", "dms", "--dmc-decision-source", "heads", "--dmc-merge-delay", "4"]
    recipe = ["--dmc-distill-weight", "1", "--dmc-lm-loss-weight", "0"]
    recipe += ["--dmc-trainable", "dmc-heads", "--dmc-target-cr", "2"]
    lengths = ["--dmc-ramp-iters", "2", "--dmc-finetune-iters", "1"]
    train([*TINY_SHARED, *flags, *recipe, *lengths, "--save", str(save)])
    records = metrics(save)
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert [r["cr_loss"] > 0 for r in records] == [False, True, True]  # target 1 at step 0

    out = export_hf(save, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["dmc_kv_method"], config["dmc_window_size"]) == ("dms", 1)
    assert (config["dmc_decision_source"], config["dmc_merge_delay"]) == ("heads", 4)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    engine = load_model(out)
    assert engine.dmc.kv_method == "dms"
    tokens = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens, use_cache=False).logits
        got = engine(tokens)
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5


@pytest.mark.slow
def test_dms_query_neuron_runs_zero_out_then_evicts_nothing_at_its_first_step(
    tmp_path: Path,
) -> None:
    """--dmc-decision-source query: zero_out anneals the query neuron to 0, so the first
    DMS step evicts about nothing (logit -5, as zero-initialised heads); the export loads in HF and the engine alike."""
    from transformers import AutoModelForCausalLM

    from megatron_dmc.convert.commands import export_hf
    from megatron_dmc.inference.loading import load_model
    from tests.training.helpers import TINY_SHARED, metrics, train

    save = tmp_path / "run"
    flags = ["--kv-method", "dms", "--dmc-decision-source", "query", "--dmc-merge-delay", "4"]
    recipe = ["--dmc-target-cr", "2", "--dmc-zero-out-iters", "2"]
    lengths = ["--dmc-zero-out-anneal-iters", "1", "--dmc-ramp-iters", "2"]
    train([*TINY_SHARED, *flags, *recipe, *lengths, "--dmc-finetune-iters", "1",
           "--save", str(save)])  # fmt: skip
    records = metrics(save)
    assert [r["stage"] for r in records] == ["zero_out"] * 2 + ["retrofit"] * 2 + ["finetune"]
    first_dms = records[2]
    # logit 100 * 0 - 5: only the training noise evicts, at rate sigmoid(-5) = 0.0067
    assert 1.0 <= first_dms["achieved_cr"] < 1.02, "the first DMS step must evict ~nothing"

    out = export_hf(save, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["dmc_kv_method"], config["dmc_decision_source"]) == ("dms", "query")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    engine = load_model(out)
    assert engine.dmc.uses_query
    tokens = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens, use_cache=False).logits
        got = engine(tokens)
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5
