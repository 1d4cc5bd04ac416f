"""The job's parts without running it: presets, step bookkeeping, training flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_dmc.pipeline import load_preset
from megatron_dmc.pipeline.assets import Assets
from megatron_dmc.pipeline.plots import running_mean
from megatron_dmc.pipeline.preset import PRESET_DIR
from megatron_dmc.pipeline.report import reached
from megatron_dmc.pipeline.retrofit import (
    first_iteration,
    read_metrics,
    retrofit_args,
    uptrain_args,
    without_dmc_flags,
    zero_out_args,
)
from megatron_dmc.pipeline.steps import Step, StepRunner
from megatron_dmc.training.arguments import parse_args


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_presets_load(name):
    preset = load_preset(name)
    assert preset.name == name and preset.target_crs
    assert {"matched_strided", "matched_continuation"} <= set(preset.eval.protocols)


def test_preset_refuses_unknown_keys_and_bad_ratios(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {seq_lenght: 8}\n")
    with pytest.raises(ValueError, match="seq_lenght"):
        load_preset(str(bad))
    bad.write_text("target_crs: [1.0]\n")
    with pytest.raises(ValueError, match="> 1"):
        load_preset(str(bad))
    bad.write_text("eval: {protocols: [matched]}\n")
    with pytest.raises(ValueError, match="unknown protocols"):
        load_preset(str(bad))
    bad.write_text("eval: {matched_chunk: 0}\n")
    with pytest.raises(ValueError, match="matched_chunk"):
        load_preset(str(bad))
    bad.write_text("eval: {gqa_uptrain: true}\n")
    with pytest.raises(ValueError, match=r"needs eval\.gqa_kv_heads"):
        load_preset(str(bad))
    with pytest.raises(ValueError, match="known presets"):
        load_preset("no_such_preset")


def test_training_flags_parse_into_the_trainers_config(tmp_path):
    preset = load_preset("medium")  # the paper recipe: zero_out, then every DMC row from it
    assets = Assets("hf", "tok", "train_prefix", "held_out_prefix")
    model = tmp_path / "model.yaml"
    first = zero_out_args(preset, assets, model, tmp_path / "meg", tmp_path / "z")
    cfg = parse_args(first)
    assert cfg.dmc.dmc_stage == "zero_out" and cfg.checkpoint.finetune
    assert cfg.batch.seq_length == preset.train.seq_length
    assert (cfg.optim.adam_eps, cfg.optim.dmc_decision_lr_mult) == (1e-8, 1000.0)
    cfg = parse_args(retrofit_args(preset, assets, model, tmp_path / "z", tmp_path / "r", 2.0))
    ramp = preset.train.ramp_iters(2.0)
    assert cfg.dmc.stages == ("zero_out", "retrofit", "finetune")
    assert (cfg.dmc.dmc_ramp_iters, cfg.dmc.dmc_retrofit_iters) == (
        ramp,
        ramp + preset.train.hold_iters,
    )
    assert cfg.checkpoint.load == str(tmp_path / "z") and not cfg.checkpoint.finetune
    assert cfg.dmc.dmc_cr_reference_length is None  # no delay: the CR is length-free
    assert first_iteration(preset, "dmc") == preset.train.zero_out_iters


def test_efficient_rows_start_from_the_import_with_the_same_steps(tmp_path):
    preset = load_preset("full")
    assets = Assets("hf", "tok", "train_prefix", "held_out_prefix")
    assert not preset.uses_zero_out
    for _, method, cr in preset.rows():
        argv = retrofit_args(preset, assets, tmp_path / "m.yaml", tmp_path / "meg", tmp_path / "r",
                             cr, method)  # fmt: skip
        cfg = parse_args(argv)
        assert cfg.dmc.kv_method == method and cfg.dmc.stages == ("retrofit", "finetune")
        assert cfg.checkpoint.finetune and cfg.checkpoint.load == str(tmp_path / "meg")
        assert cfg.dmc.schedule_iters == preset.train.total_iters(cr)  # zero_out's steps held
        assert (cfg.dmc.dmc_merge_delay, cfg.retrofit.dmc_trainable) == (64, "dmc-heads")
        assert cfg.dmc.dmc_cr_reference_length is None  # train.cr_at_eval_length is off
        assert first_iteration(preset, method) == 0
    labels = [label for label, _, _ in preset.rows()]
    assert labels == ["dmc 2x", "dmc 4x", "dmc 8x", "dms 2x", "dms 4x", "dms 8x"]
    preset.train.cr_at_eval_length = True
    argv = retrofit_args(preset, assets, tmp_path / "m.yaml", tmp_path / "meg", tmp_path / "r", 2.0)
    eval_length = preset.eval.context_len + preset.eval.continuation_len
    assert parse_args(argv).dmc.dmc_cr_reference_length == eval_length


def test_gqa_uptraining_copies_the_dmc_runs_budget_schedule_and_data(tmp_path):
    preset = load_preset("full")
    preset.train.extra_args = ["--clip-grad", "0.5", "--dmc-decision-lr-mult", "4"]
    assets = Assets("hf", "tok", "train_prefix", "held_out_prefix")
    assert preset.gqa_budget_cr(3.0) == 4.0 and preset.gqa_budget_cr(2.0) == 2.0
    model = tmp_path / "model.yaml"
    dmc = parse_args(retrofit_args(preset, assets, model, tmp_path / "z", tmp_path / "r", 4.0))
    plain_argv = uptrain_args(
        preset, assets, tmp_path / "gqa.yaml", tmp_path / "m", tmp_path / "g", 4.0, 1
    )
    plain = parse_args(plain_argv)
    assert plain.dmc.stages == ("plain",) and plain.checkpoint.finetune
    assert plain.dmc.plain_iters == dmc.dmc.schedule_iters == preset.train.total_iters(4.0)
    assert plain.dmc.plain_decay_iters == dmc.dmc.dmc_finetune_iters
    assert vars(plain.batch) == vars(dmc.batch) and vars(plain.data) == vars(dmc.data)
    assert vars(plain.optim) == vars(dmc.optim) | {"dmc_decision_lr_mult": 1.0}
    assert plain.optim.clip_grad == 0.5 and dmc.optim.dmc_decision_lr_mult == 4.0
    assert plain.optim.adam_eps == 1e-8  # the recipe's, not a DMC flag
    assert without_dmc_flags(["--a", "--dmc-x=1", "--dmc-y", "2", "--b", "3"]) == [
        "--a",
        "--b",
        "3",
    ]


def _step(name: str, log: list[str], out: Path, resumable: bool = False) -> Step:
    def run() -> None:
        log.append(name)
        out.mkdir(exist_ok=True)
        (out / "part").write_text("x")

    return Step(name, name, run, [out], resumable)


def test_runner_skips_done_steps_and_reruns_everything_after_a_redo(tmp_path):
    log: list[str] = []
    steps = [_step(n, log, tmp_path / n) for n in ("a", "b", "c")]
    for runner in (StepRunner(tmp_path / "done"), StepRunner(tmp_path / "done")):
        for step in steps:
            runner(step)
    assert log == ["a", "b", "c"]
    runner = StepRunner(tmp_path / "done", redo=("b",))
    for step in steps:
        runner(step)
    assert log == ["a", "b", "c", "b", "c"]
    assert json.loads((tmp_path / "done" / "b.json").read_text())["wall_s"] >= 0


def test_runner_keeps_partial_outputs_of_resumable_steps_only(tmp_path):
    for resumable in (True, False):
        out = tmp_path / f"r{resumable}"
        out.mkdir()
        (out / "checkpoint").write_text("half")
        StepRunner(tmp_path / "done")(_step(f"s{resumable}", [], out, resumable))
        assert (out / "checkpoint").exists() == resumable


def test_read_metrics_keeps_the_last_record_of_a_repeated_iteration(tmp_path):
    lines = [{"iteration": 1, "lm_loss": 3.0}, {"iteration": 2, "lm_loss": 2.0},
             {"iteration": 2, "lm_loss": 1.5}, {"iteration": 3, "lm_loss": 1.0}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [r["lm_loss"] for r in read_metrics(tmp_path)] == [3.0, 1.5, 1.0]


def test_running_mean_and_reached():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert reached(1.85, 2.0) and not reached(1.75, 2.0) and not reached(None, 2.0)


def test_eval_rows_compare_every_method_at_each_target(tmp_path):
    from megatron_dmc.pipeline.evaluation import eval_jobs

    settings = load_preset("full").eval
    exports = {("dmc", 2.0): tmp_path / "e2", ("dmc", 4.0): tmp_path / "e4",
               ("dms", 2.0): tmp_path / "s2"}  # fmt: skip
    jobs = eval_jobs("src", exports, settings, tmp_path / "gqa", 3.0, tmp_path / "up")
    assert [j.key for j in jobs] == ["vanilla", "dmc_2x", "dms_2x", "h2o_2x", "tova_2x",
                                     "dmc_4x", "h2o_4x", "tova_4x", "gqa_3x",
                                     "gqa_uptrained_3x"]  # fmt: skip
    assert {j.model_dir for j in jobs if j.method in ("h2o", "tova")} == {"src"}
    assert [(j.label, j.method) for j in jobs[1:3]] == [("dmc", "dmc"), ("dms", "dmc")]
    assert [(j.label, j.model_dir) for j in jobs[-2:]] == [
        ("gqa-pooled", str(tmp_path / "gqa")),
        ("gqa-uptrained", str(tmp_path / "up")),
    ]
