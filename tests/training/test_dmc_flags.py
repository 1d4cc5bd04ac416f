"""--dmc-decision-source and --dmc-merge-delay: parsed, wired to the model, refused early."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_dmc.convert.commands import import_hf
from megatron_dmc.training.arguments import parse_args
from megatron_dmc.training.model_api import dmc_config, export_metadata
from megatron_dmc.training.stages import plan
from megatron_dmc.training.validate import validate
from tests.convert.helpers import edit_config, write_tiny_llama

BASE = ["--model", "tiny_gqa", "--mock-data", "--seq-length", "32"]


def test_flags_reach_the_layer_config_and_the_export_metadata() -> None:
    cfg = parse_args([*BASE, "--dmc-decision-source", "heads", "--dmc-merge-delay", "3"])
    config = dmc_config(cfg)
    assert (config.decision_source, config.merge_delay) == ("heads", 3)
    assert dmc_config(parse_args(BASE)).decision_source == "channel"
    model_config = validate(cfg, world_size=1)
    metadata = export_metadata(model_config, cfg, [[2.0, 2.0]] * 4)["megatron_dmc"]
    assert metadata["llama"]["dmc_decision_heads"] is True
    assert (metadata["dmc"]["decision_source"], metadata["dmc"]["merge_delay"]) == ("heads", 3)


def test_heads_mode_has_no_zero_out_stage() -> None:
    cfg = parse_args([*BASE, "--dmc-decision-source", "heads"])
    assert [s.name for s in plan(cfg.dmc)] == ["retrofit", "finetune"]
    assert cfg.dmc.schedule_iters == cfg.dmc.dmc_retrofit_iters + cfg.dmc.dmc_finetune_iters
    assert [s.name for s in plan(parse_args(BASE).dmc)] == ["zero_out", "retrofit", "finetune"]
    with pytest.raises(ValueError, match="nothing to zero"):
        parse_args([*BASE, "--dmc-decision-source", "heads", "--dmc-stage", "zero_out"])


def test_bad_values_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        parse_args([*BASE, "--dmc-merge-delay", "-1"])
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*BASE, "--dmc-decision-source", "neuron"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_delay_that_cannot_reach_the_target_cr_is_refused() -> None:
    ok = parse_args([*BASE, "--dmc-target-cr", "4", "--dmc-merge-delay", "7"])
    validate(ok, world_size=1)  # 32 / (7 + 1) = 4: reachable
    too_long = parse_args([*BASE, "--dmc-target-cr", "4", "--dmc-merge-delay", "8"])
    with pytest.raises(ValueError, match="no sequence can reach"):
        validate(too_long, world_size=1)


def test_heads_mode_refuses_a_channel_dmc_checkpoint(tmp_path: Path) -> None:
    hf = write_tiny_llama(tmp_path / "hf")
    vanilla = import_hf(hf, tmp_path / "vanilla")
    edit_config(hf, model_type="llama_dmc")
    channel = import_hf(hf, tmp_path / "channel")
    heads = ["--dmc-decision-source", "heads", "--dmc-stage", "retrofit"]
    validate(parse_args([*BASE, *heads, "--load", str(vanilla)]), world_size=1)
    with pytest.raises(ValueError, match="channel-mode DMC model"):
        validate(parse_args([*BASE, *heads, "--load", str(channel)]), world_size=1)


@pytest.mark.slow
def test_heads_with_delay_trains_saves_and_exports(tmp_path: Path) -> None:
    from megatron_dmc.convert.commands import export_hf
    from megatron_dmc.convert.hf_io import HFCheckpoint
    from tests.training.helpers import TINY_SHARED, metrics, train

    save = tmp_path / "run"
    flags = ["--dmc-decision-source", "heads", "--dmc-merge-delay", "4", "--dmc-target-cr", "2"]
    lengths = ["--dmc-ramp-iters", "2", "--dmc-finetune-iters", "1"]
    train([*TINY_SHARED, *flags, *lengths, "--save", str(save)])
    records = metrics(save)
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert all(r["achieved_cr"] >= 1.0 for r in records)
    assert [r["cr_loss"] > 0 for r in records] == [False, True, True]  # target 1 at step 0
    out = export_hf(save, tmp_path / "hf")
    config = (out / "config.json").read_text()
    assert '"dmc_decision_source": "heads"' in config and '"dmc_merge_delay": 4' in config
    names = HFCheckpoint(out).files
    assert "model.layers.3.self_attn.dmc_decision_proj.weight" in names


HEADS_RUN = [
    "--dmc-decision-source", "heads", "--dmc-merge-delay", "4", "--dmc-target-cr", "2",
    "--dmc-ramp-iters", "2", "--dmc-finetune-iters", "2",
]  # fmt: skip


@pytest.mark.slow
def test_heads_run_from_a_vanilla_checkpoint_resumes_bitwise(initial, tmp_path: Path) -> None:
    """Starts from the converted vanilla model (the heads start at zero: that checkpoint has
    none), and a launch stopped mid-retrofit continues exactly as the uninterrupted run."""
    from tests.training.helpers import KEYS, TINY_SHARED, curves, train

    whole, halves = tmp_path / "whole", tmp_path / "halves"
    train([*TINY_SHARED, *HEADS_RUN, "--save", str(whole), "--load", str(initial)])
    base = [*TINY_SHARED, *HEADS_RUN, "--save", str(halves), "--load", str(initial)]
    train([*base, "--train-iters", "1"])
    train(base)
    want, got = curves(whole), curves(halves)
    assert want["iteration"] == [1, 2, 3, 4] and got["iteration"][-3:] == [2, 3, 4]
    for key in KEYS:
        assert got[key][-3:] == want[key][-3:], key


def test_kv_method_dms_reaches_the_layer_config_and_the_export_metadata() -> None:
    flags = ["--kv-method", "dms", "--dmc-decision-source", "heads", "--dmc-merge-delay", "3"]
    cfg = parse_args([*BASE, *flags])
    config = dmc_config(cfg)
    assert (config.kv_method, config.window_size, config.merge_delay) == ("dms", 1, 3)
    assert dmc_config(parse_args(BASE)).kv_method == "dmc"
    model_config = validate(cfg, world_size=1)
    metadata = export_metadata(model_config, cfg, [[2.0, 2.0]] * 4)["megatron_dmc"]
    assert (metadata["dmc"]["kv_method"], metadata["dmc"]["window_size"]) == ("dms", 1)


def test_kv_method_dms_needs_decision_heads(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="--dmc-decision-source heads"):
        parse_args([*BASE, "--kv-method", "dms"])
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*BASE, "--kv-method", "h2o"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_dms_query_neuron_runs_zero_out_first_and_exports_no_heads() -> None:
    flags = ["--kv-method", "dms", "--dmc-decision-source", "query", "--dmc-merge-delay", "3"]
    cfg = parse_args([*BASE, *flags])
    config = dmc_config(cfg)
    assert (config.kv_method, config.decision_source, config.window_size) == ("dms", "query", 1)
    assert [s.name for s in plan(cfg.dmc)] == ["zero_out", "retrofit", "finetune"]
    model_config = validate(cfg, world_size=1)
    metadata = export_metadata(model_config, cfg, [[2.0, 2.0]] * 4)["megatron_dmc"]
    assert metadata["llama"]["dmc_decision_heads"] is False
    assert (metadata["dmc"]["kv_method"], metadata["dmc"]["decision_source"]) == ("dms", "query")


def test_query_neuron_is_dms_only() -> None:
    with pytest.raises(ValueError, match="--kv-method dms"):
        parse_args([*BASE, "--dmc-decision-source", "query"])
    with pytest.raises(ValueError, match="dmc-heads"):
        parse_args([*BASE, "--kv-method", "dms", "--dmc-decision-source", "query",
                    "--dmc-trainable", "dmc-heads"])  # fmt: skip


def test_the_cr_loss_asks_the_reference_lengths_cr_at_the_training_length() -> None:
    from megatron_dmc.ops import training_length_cr
    from megatron_dmc.training.loop import Run

    flags = ["--dmc-merge-delay", "4", "--dmc-target-cr", "2", "--dmc-cr-overshoot", "0.05"]
    cfg = parse_args([*BASE, *flags, "--dmc-cr-reference-length", "96"])
    run = Run(cfg, validate(cfg, world_size=1), *([None] * 7))
    finetune = plan(cfg.dmc)[-1]
    settings = run.settings(finetune, 0)
    assert settings.cr_overshoot == 0.05 and settings.target_cr == training_length_cr(
        2.0, 32, 4, 96
    )
    assert 1.0 < settings.target_cr < 2.0
    paper = parse_args([*BASE, "--dmc-target-cr", "2"])
    paper_run = Run(paper, validate(paper, world_size=1), *([None] * 7))
    assert paper_run.settings(plan(paper.dmc)[-1], 0).cr_overshoot is None
    with pytest.raises(ValueError, match="--dmc-cr-overshoot must be >= 0"):
        parse_args([*BASE, "--dmc-cr-overshoot", "-0.1"])


def test_an_unreachable_reference_length_is_refused() -> None:
    cfg = parse_args([*BASE, "--dmc-merge-delay", "7", "--dmc-target-cr", "2",
                      "--dmc-cr-reference-length", "15"])  # fmt: skip
    with pytest.raises(ValueError, match="--dmc-cr-reference-length 15 tokens exact"):
        validate(cfg, world_size=1)
    with pytest.raises(ValueError, match="must be > 0"):
        parse_args([*BASE, "--dmc-cr-reference-length", "0"])
