"""Flags, YAML and validation: bad runs are refused before any work."""

from __future__ import annotations

import pytest

from megatron_dmc.training.arguments import parse_args
from megatron_dmc.training.stages import plan, start_position
from megatron_dmc.training.validate import validate

BASE = ["--model", "tiny_gqa", "--mock-data", "--seq-length", "32"]


def _validate(extra: list[str], world_size: int = 1) -> None:
    validate(parse_args(BASE + extra), world_size=world_size)


@pytest.mark.parametrize(
    ("extra", "world", "message"),
    [
        (["--tensor-model-parallel-size", "4"], 4, "num_key_value_heads"),
        (["--pipeline-model-parallel-size", "3"], 3, "num_hidden_layers"),
        (["--global-batch-size", "3", "--micro-batch-size", "2"], 1, "--global-batch-size"),
        (["--tensor-model-parallel-size", "2"], 3, "cannot be split"),
        (["--sequence-parallel", "--tensor-model-parallel-size", "2"], 2, "sequence"),
        (["--seq-length", "4096"], 1, "max_position_embeddings"),
        (["--bf16"], 1, "needs a GPU"),
        (["--recompute-granularity", "full"], 1, "use --recompute-granularity selective"),
    ],
)
def test_bad_layouts_are_rejected(extra: list[str], world: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _validate(extra, world)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "tiny_gqa"], "--data-path is required"),
        (["--model", "tiny_gqa", "--mock-data", "--dmc-target-cr", "1"], "must be > 1"),
        (["--model", "tiny_gqa", "--mock-data", "--dmc-target-cr", "0.5"], "must be > 1"),
        (["--mock-data"], "--model is required"),
        (["--model", "tiny_gqa", "--mock-data", "--dmc-zero-out-anneal-iters", "300"], "anneal"),
    ],
)
def test_bad_flags_are_rejected(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


PLAIN = [*BASE, "--dmc-stage", "plain", "--plain-iters", "10"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dmc-stage", "plain"], "needs --plain-iters"),
        (["--plain-iters", "10"], "apply to --dmc-stage plain only"),
        (["--dmc-stage", "all", "--plain-decay-iters", "2"], "plain only"),
        ([*PLAIN[len(BASE) :], "--plain-decay-iters", "11"], r"in \[0, --plain-iters=10\]"),
        ([*PLAIN[len(BASE) :], "--plain-iters", "0"], "must be > 0"),
        ([*PLAIN[len(BASE) :], "--dmc-target-cr", "2"], "--dmc-target-cr do"),
        ([*PLAIN[len(BASE) :], "--dmc-ramp-iters", "5", "--dmc-window-size", "4"], "window"),
        ([*PLAIN[len(BASE) :], "--dmc-decision-lr-mult", "8"], "no decision rows"),
    ],
)
def test_plain_stage_refuses_dmc_flags_and_bad_lengths(extra: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_args([*BASE, *extra])


def test_plain_stage_allows_full_recompute() -> None:
    _validate([*PLAIN[len(BASE) :], "--recompute-granularity", "full"])


def test_missing_data_path_names_the_tool(tmp_path) -> None:
    cfg = parse_args(
        BASE[:1] + BASE[1:2] + ["--seq-length", "32", "--data-path", str(tmp_path / "nope")]
    )
    with pytest.raises(ValueError, match=r"preprocess_data\.py"):
        validate(cfg, world_size=1)


def test_yaml_config_and_command_line_wins(tmp_path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("seq-length: 16\nlr: 0.5\ndmc_target_cr: 3\n")
    cfg = parse_args(["--config", str(run), "--model", "tiny_gqa", "--mock-data", "--lr", "0.1"])
    assert (cfg.batch.seq_length, cfg.optim.lr, cfg.dmc.dmc_target_cr) == (16, 0.1, 3.0)
    run.write_text("no-such-flag: 1\n")
    with pytest.raises(ValueError, match="unknown key 'no-such-flag'; see --help"):
        parse_args(["--config", str(run)])


def test_yaml_values_are_typed_like_the_command_line(tmp_path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("lr: 5e-3\nmin_lr: 1e-4\ndmc-stage: retrofit\nmock-data: true\nbf16: false\n")
    cfg = parse_args(["--config", str(run), "--model", "tiny_gqa"])
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.dmc.dmc_stage) == (5e-3, 1e-4, "retrofit")
    assert cfg.data.mock_data is True and cfg.model.bf16 is False


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lr", "abc", "argument --lr: invalid float value: 'abc'"),
        ("dmc-stage", "retrofitt", "argument --dmc-stage: invalid choice: 'retrofitt'"),
        ("seq-length", "32.5", "argument --seq-length: invalid int value: '32.5'"),
        ("recompute-granularity", "ful", "argument --recompute-granularity: invalid choice"),
    ],
)
def test_yaml_values_get_the_command_line_messages(tmp_path, capsys, key, value, message):
    run = tmp_path / "run.yaml"
    run.write_text(f"{key}: {value}\n")
    with pytest.raises(ValueError) as refused:
        parse_args([*BASE, "--config", str(run)])
    assert str(refused.value).startswith(f"--config {run}: {message}")
    with pytest.raises(SystemExit) as exited:
        parse_args([*BASE, f"--{key}", value])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dmc-stgae: all", r"unknown key .dmc-stgae. \(did you mean --dmc-stage\?\)"),
        ("mock-data: maybe", "--mock-data takes true or false; got 'maybe'"),
        ("lr: [1, 2]", "--lr takes one value"),
        ("lr: 0.1\nmin-lr: 0.5", r"--min-lr must be in \[0, --lr=0.1\]"),
        ("lr: [", "not valid YAML"),
    ],
)
def test_yaml_typos_and_bad_values_are_refused(tmp_path, text: str, message: str) -> None:
    run = tmp_path / "run.yaml"
    run.write_text(text + "\n")
    with pytest.raises(ValueError, match=message):
        parse_args([*BASE, "--config", str(run)])


def test_default_ramp_follows_the_release_pace() -> None:
    cfg = parse_args([*BASE, "--dmc-target-cr", "4"])
    assert cfg.dmc.dmc_ramp_iters == 18000 and cfg.dmc.dmc_retrofit_iters == 18000


def test_start_position_continues_or_advances() -> None:
    stages = plan(parse_args(BASE).dmc)
    assert start_position(stages, None, 0, False).stage_index == 0
    assert vars(start_position(stages, "retrofit", 7, False)) == {"stage_index": 1, "step": 7}
    assert start_position(stages, "zero_out", 250, True).stage_index == 1
    only_finetune = plan(parse_args([*BASE, "--dmc-stage", "finetune"]).dmc)
    with pytest.raises(ValueError, match="not finished"):
        start_position(only_finetune, "zero_out", 250, True)
    only_zero_out = plan(parse_args([*BASE, "--dmc-stage", "zero_out"]).dmc)
    with pytest.raises(ValueError, match="later than"):
        start_position(only_zero_out, "retrofit", 3, False)


def test_plain_resumes_itself_and_refuses_dmc_checkpoints() -> None:
    plain = plan(parse_args(PLAIN).dmc)
    assert [(s.name, s.iters, s.attention) for s in plain] == [("plain", 10, "vanilla")]
    assert plain[0].target_cr(3) is None and plain[0].zero_out_scale(0) is None
    assert vars(start_position(plain, None, 0, False)) == {"stage_index": 0, "step": 0}
    assert vars(start_position(plain, "plain", 4, False)) == {"stage_index": 0, "step": 4}
    assert start_position(plain, "plain", 10, True).stage_index == 1
    with pytest.raises(ValueError, match="--finetune"):
        start_position(plain, "zero_out", 2, True)
    with pytest.raises(ValueError, match="do not continue each other"):
        start_position(plan(parse_args(BASE).dmc), "plain", 10, True)
