"""--dmc-stage plain: vanilla continued training on a DMC run's schedule and data, with the
same checkpoints, resume and metrics, exported as a plain HF Llama."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from megatron_dmc.schema.checkpoint import METADATA_KEY
from megatron_dmc.training import checkpoint as ckpt
from megatron_dmc.training.arguments import parse_args
from megatron_dmc.training.optim import stage_lr_scheduler
from megatron_dmc.training.stages import plan
from tests.training.helpers import KEYS, TINY_SHARED, curves, metrics, train

DMC_SCHEDULE = ["--dmc-zero-out-iters", "3", "--dmc-zero-out-anneal-iters", "2",
                "--dmc-ramp-iters", "4", "--dmc-retrofit-iters", "5", "--dmc-finetune-iters", "4"]  # fmt: skip
PLAIN_SCHEDULE = ["--dmc-stage", "plain", "--plain-iters", "12", "--plain-decay-iters", "4"]


def _lr_per_step(argv: list[str]) -> list[float]:
    """The LR of every step of the launch's stages, as the train loop sets it."""
    cfg = parse_args(argv)
    lrs = []
    for stage in plan(cfg.dmc):
        optimizer = SimpleNamespace(param_groups=[{}])
        scheduler = stage_lr_scheduler(optimizer, stage, cfg.optim, 0)
        for _ in range(stage.iters):
            lrs.append(optimizer.param_groups[0]["lr"])
            scheduler.step(1)
    return lrs


@pytest.mark.parametrize("style", ["linear", "cosine", "constant"])
def test_plain_lr_is_the_dmc_schedule_of_the_same_length(style: str) -> None:
    shared = [*TINY_SHARED, "--lr-decay-style", style]
    dmc = _lr_per_step([*shared, *DMC_SCHEDULE])
    plain = _lr_per_step([*shared, *PLAIN_SCHEDULE])
    assert len(dmc) == 12 and plain == dmc
    assert plain[:9] == [1e-3] * 9
    if style != "constant":
        assert plain[8] > plain[9] > plain[10] > plain[11] > 1e-4


def test_plain_run_sees_the_dmc_runs_data(reference, initial, tmp_path) -> None:
    """Same weights, same first batch: at step 1 zero_out's lambda is 1 (vanilla attention)."""
    save = tmp_path / "plain"
    train([*TINY_SHARED, "--dmc-stage", "plain", "--plain-iters", "5", "--save", str(save),
           "--load", str(initial), "--finetune", "--train-iters", "1"])  # fmt: skip
    first = metrics(save)[0]
    assert first["lm_loss"] == pytest.approx(reference[1]["lm_loss"][0], rel=1e-5)


def test_plain_run_trains_resumes_bitwise_and_exports_a_plain_llama(initial, tmp_path) -> None:
    argv = [*TINY_SHARED, "--dmc-stage", "plain", "--plain-iters", "5",
            "--plain-decay-iters", "3", "--load", str(initial), "--finetune"]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train([*argv, "--save", str(whole)])
    train([*argv, "--save", str(parts), "--train-iters", "2"])
    assert (parts / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    progress = train([*argv, "--save", str(parts)])
    assert (progress.stage, progress.iteration, progress.stage_done) == ("plain", 5, True)
    want, got = curves(whole), curves(parts)
    for key in ("iteration", *KEYS):
        assert got[key] == want[key], key
    records = metrics(whole)
    assert {r["stage"] for r in records} == {"plain"}
    assert all(r.get("achieved_cr") is None and r["target_cr"] is None for r in records)
    assert want["lr"] == pytest.approx([1e-3, 1e-3, 1e-3, 7e-4, 4e-4])
    assert want["lm_loss"][-1] < want["lm_loss"][0]
    assert ckpt.read_common(whole)[METADATA_KEY]["dmc"] is None
    _assert_plain_hf_export(whole, tmp_path / "hf")


def _assert_plain_hf_export(run_dir, hf_dir) -> None:
    from transformers import AutoModelForCausalLM

    from megatron_dmc.convert.commands import export_hf

    export_hf(run_dir, hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
    assert not any(key.startswith("dmc") for key in config)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
