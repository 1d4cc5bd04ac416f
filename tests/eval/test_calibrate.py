"""Calibrating the decision threshold: the search lands the real CR on the target, the
export keeps it, and bad input is refused before any work."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_dmc.eval.calibrate import (
    CALIBRATION_FILE,
    CalibrationSettings,
    calibrate_threshold,
    search_threshold,
)
from megatron_dmc.eval.calibrate_cli import main as calibrate_main
from megatron_dmc.eval.methods import build_method, load_model
from megatron_dmc.eval.perplexity import continuation_perplexity
from megatron_dmc.hf import DMCLlamaForCausalLM
from tests.hf.helpers import fire_heads, tiny_config

CONTEXT, CONTINUATION, SAMPLES = 48, 16, 2


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A tiny heads-mode DMC export whose untrained decisions merge about 1.5x."""
    config = tiny_config(dmc_decision_source="heads", dmc_window_size=4, dmc_target_cr=2.0)
    model = fire_heads(DMCLlamaForCausalLM(config).eval(), std=0.12)
    path = tmp_path_factory.mktemp("export")
    model.save_pretrained(path)
    return path


def _tokens(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 101, (SAMPLES * (CONTEXT + CONTINUATION),), generator=gen)


def _real_cr(model, tokens: torch.Tensor) -> float:
    result = continuation_perplexity(
        model, build_method("dmc"), tokens, CONTEXT, CONTINUATION, max_samples=SAMPLES
    )
    return float(result.real_cr)


def _staircase(threshold: float) -> float:
    """A real CR that falls in steps of 0.01 as tau grows (2.4 at 0, 1.0 from tau = 7)."""
    return max(1.0, round(2.4 - 0.2 * threshold, 2))


@pytest.mark.parametrize("target", [1.5, 2.0, 2.8, 3.9])
def test_search_brackets_both_ways_and_keeps_the_largest_tau_reaching_the_target(target):
    settings = CalibrationSettings(target, tolerance=0.02)
    calibration = search_threshold(_staircase, settings)
    assert calibration.uncalibrated_cr == 2.4 and calibration.probes[0] == (0.0, 2.4)
    assert target <= calibration.real_cr <= target * 1.02
    assert (calibration.threshold > 0) == (target < 2.4)
    reaching = [t for t, cr in calibration.probes if cr >= target]
    assert calibration.threshold == max(reaching)
    assert len(calibration.probes) <= 8 + settings.narrowing_probes


def test_unreachable_target_keeps_the_most_compressing_probe():
    calibration = search_threshold(lambda t: min(3.0, _staircase(t)), CalibrationSettings(5.0))
    assert calibration.real_cr == 3.0 and calibration.threshold < 0
    assert [t for t, _ in calibration.probes[:3]] == [0.0, -1.0, -2.0]


@pytest.mark.parametrize("target", [1.3, 2.5])
def test_search_lands_the_real_cr_on_the_target(export_dir, target):
    model, tokens = load_model(export_dir), _tokens()
    settings = CalibrationSettings(target, CONTEXT, CONTINUATION, SAMPLES, tolerance=0.05)
    calibration = calibrate_threshold(model, tokens, settings)
    assert calibration.uncalibrated_cr == calibration.probes[0][1]
    assert abs(calibration.uncalibrated_cr - target) > 0.05 * target  # there was work to do
    assert target <= calibration.real_cr <= target * 1.05
    assert (calibration.threshold > 0) == (calibration.uncalibrated_cr > target)
    assert model.config.dmc_decision_threshold == calibration.threshold
    assert _real_cr(model, tokens) == pytest.approx(calibration.real_cr, rel=1e-12)


def _indexed_dataset(prefix, tokens: torch.Tensor) -> str:
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    builder.add_item(tokens.to(torch.int32))
    builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_cli_writes_the_threshold_and_the_search(export_dir, tmp_path, capsys):
    out = tmp_path / "model"
    shutil.copytree(export_dir, out)
    tokens = _tokens(seed=1)
    short = _indexed_dataset(tmp_path / "short", tokens[:50])
    args = ["--model", str(out), "--context-len", str(CONTEXT),
            "--continuation-len", str(CONTINUATION), "--samples", str(SAMPLES),
            "--tolerance", "0.05"]  # fmt: skip
    before = (out / "config.json").read_text()
    with pytest.raises(ValueError, match="calibration text has 50 tokens"):
        calibrate_main([*args, "--data-path", short])
    assert (out / "config.json").read_text() == before
    calibrate_main([*args, "--data-path", _indexed_dataset(tmp_path / "calib", tokens)])
    printed = json.loads(capsys.readouterr().out)
    settings = CalibrationSettings(2.0, CONTEXT, CONTINUATION, SAMPLES, tolerance=0.05)
    expected = calibrate_threshold(load_model(export_dir), tokens, settings)
    assert printed["threshold"] == expected.threshold
    assert [tuple(p) for p in printed["probes"]] == expected.probes
    config = json.loads((out / "config.json").read_text())
    assert config["dmc_decision_threshold"] == expected.threshold
    assert json.loads((out / CALIBRATION_FILE).read_text())["real_cr"] == expected.real_cr
    reloaded = load_model(out)
    assert _real_cr(reloaded, tokens) == pytest.approx(expected.real_cr, rel=1e-12)


def test_cli_refuses_a_plain_llama(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="is not a DMC export"):
        calibrate_main(["--model", str(plain), "--data-path", "/unused"])
