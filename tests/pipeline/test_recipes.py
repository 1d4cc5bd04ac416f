"""Recipes as data, the presets' trained rows, the --recipe switch, the targets the report
judges and the ablation's variants and table, without training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_dmc import demo
from megatron_dmc.pipeline import load_preset
from megatron_dmc.pipeline.ablation import ablation_markdown, variant_flags, variant_preset
from megatron_dmc.pipeline.recipes import effective_values, recipe_flags, uses_zero_out
from megatron_dmc.pipeline.targets import dms_verdicts, rise_verdicts, rows_table
from megatron_dmc.training.arguments import parse_args

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"
BASE = ["--model", "tiny_mha", "--mock-data"]


def test_recipes_are_train_configs_with_the_documented_settings():
    paper = parse_args(["--config", str(RECIPES / "paper.yaml"), *BASE])
    assert (paper.dmc.dmc_decision_source, paper.dmc.dmc_merge_delay) == ("channel", 0)
    assert (paper.retrofit.dmc_distill_weight, paper.retrofit.dmc_trainable) == (0.0, "all")
    assert (paper.optim.adam_eps, paper.optim.dmc_decision_lr_mult) == (1e-8, 1000.0)
    assert paper.dmc.dmc_cr_loss_weight == 10.0
    eff = parse_args(["--config", str(RECIPES / "efficient.yaml"), *BASE])
    assert (eff.dmc.dmc_decision_source, eff.dmc.dmc_merge_delay) == ("heads", 64)
    assert (eff.retrofit.dmc_distill_weight, eff.retrofit.dmc_lm_loss_weight) == (1.0, 0.0)
    assert eff.retrofit.dmc_trainable == "dmc-heads" and eff.dmc.stages == ("retrofit", "finetune")
    assert parse_args([*recipe_flags("efficient"), *BASE]) == eff


def test_extra_args_win_over_the_recipe_and_bad_ones_are_refused():
    values = effective_values("efficient", ["--dmc-merge-delay", "8"])
    assert values["dmc_merge_delay"] == 8 and not uses_zero_out(values)
    assert uses_zero_out(effective_values("paper", []))
    with pytest.raises(ValueError, match="unknown training flags"):
        effective_values("paper", ["--no-such-flag"])
    with pytest.raises(ValueError, match="known recipes"):
        recipe_flags("fast")


def test_zero_out_lengths_may_be_zero_only_without_zero_out():
    base = [*BASE, "--dmc-zero-out-iters", "0", "--dmc-zero-out-anneal-iters", "0"]
    assert parse_args([*base, "--dmc-decision-source", "heads"]).dmc.dmc_zero_out_iters == 0
    with pytest.raises(ValueError, match="--dmc-zero-out-iters must be > 0"):
        parse_args(base)


def test_presets_refuse_rows_they_cannot_train(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {recipe: paper, methods: [dms]}\n")
    with pytest.raises(ValueError, match="dms, which needs decision heads"):
        load_preset(str(bad))
    bad.write_text("train: {seq_length: 256}\ntarget_crs: [4.0]\n")
    with pytest.raises(
        ValueError, match=r"merge delay 64 at train\.seq_length 256 cannot reach 4x"
    ):
        load_preset(str(bad))
    bad.write_text(
        "train: {cr_at_eval_length: true}\neval: {context_len: 96, continuation_len: 32}\n"
    )
    with pytest.raises(ValueError, match=r"at the evaluation length 128 cannot reach 2x"):
        load_preset(str(bad))
    bad.write_text("train: {methods: [gqa]}\n")
    with pytest.raises(ValueError, match=r"train\.methods"):
        load_preset(str(bad))
    bad.write_text("rise_targets: {dmc 4x: 8}\n")
    with pytest.raises(ValueError, match="does not train"):
        load_preset(str(bad))


def test_recipe_switch_keeps_dmc_rows_and_moves_the_output(tmp_path, monkeypatch):
    full = load_preset("full")
    paper = demo.with_recipe(full, "paper")
    assert paper.train.recipe == "paper" and paper.uses_zero_out
    assert [label for label, _, _ in paper.rows()] == ["dmc 2x", "dmc 4x", "dmc 8x"]
    seen = {}

    class FakeJob:
        def __init__(self, preset, out, cache_dir):
            seen.update(preset=preset, out=out)

        def run(self, *args):
            return seen["out"] / "report.md"

    monkeypatch.setattr(demo, "Job", FakeJob)
    assert demo.main(["--recipe", "paper"]) == 0
    assert str(seen["out"]) == "outputs/demo-paper" and seen["preset"].train.recipe == "paper"
    assert demo.main(["--recipe", "efficient"]) == 0 and str(seen["out"]) == "outputs/demo"
    assert demo.main(["--recipe", "nope"]) == 2


def _summary(dmc: float, dms: float, h2o: float, tova: float, cr: float = 2.0) -> dict:
    def row(method, ppl, ratio):
        return {"method": method, "compression_ratio": ratio, "ppl_continuation": ppl,
                "ppl_matched_continuation": ppl}  # fmt: skip

    results = [row("vanilla", 10.0, 1.0), row("dmc", dmc, cr), row("dms", dms, cr),
               row("h2o", h2o, cr), row("tova", tova, cr)]  # fmt: skip
    training = [{"label": f"{m} {cr:g}x", "method": m, "target_cr": cr, "steps": 3,
                 "tokens": 96, "wall_s": 4.0, "final_achieved_cr": 1.9, "recipe": "efficient"}
                for m in ("dmc", "dms")]  # fmt: skip
    return {"results": results, "training": training, "preset": {"rise_targets": {"dmc 2x": 10}}}


def test_rise_targets_are_judged_with_the_margin():
    met = rise_verdicts(_summary(dmc=10.9, dms=11, h2o=11, tova=11))
    assert [v.protocol for v in met] == ["matched continuation", "continuation"]
    assert all(v.met for v in met) and "+9.0%" in met[0].detail
    missed = rise_verdicts(_summary(dmc=11.5, dms=11, h2o=11, tova=11))
    assert not missed[0].met and "missed by 5.0 points" in missed[0].detail


def test_dms_must_match_h2o_below_8x_and_beat_both_at_8x():
    assert all(v.met for v in dms_verdicts(_summary(10, dms=11.0, h2o=11.0, tova=10.5)))
    at8 = dms_verdicts(_summary(10, dms=11.0, h2o=11.0, tova=12.0, cr=8.0))
    assert not at8[0].met and "missed by 0.0 points" in at8[0].detail
    assert "H2O and TOVA" in at8[0].goal
    at8 = dms_verdicts(_summary(10, dms=10.5, h2o=11.0, tova=12.0, cr=8.0))
    assert all(v.met for v in at8)
    table = rows_table(_summary(10, 10, 10, 10))
    assert "| dms 2x | efficient | 3 | 96 | 4 | 1.900 |" in table


def test_ablation_variants_compose_deltas_on_the_paper_recipe():
    assert variant_flags("heads+distill+delay16") == [
        "--dmc-decision-source", "heads", "--dmc-distill-weight", "1",
        "--dmc-lm-loss-weight", "0", "--dmc-merge-delay", "16",
    ]  # fmt: skip
    tiny = load_preset("tiny")
    paper = variant_preset(tiny, "paper", [2.0])
    assert paper.uses_zero_out and paper.train.extra_args == [] and not paper.eval.baselines
    lora = variant_preset(tiny, "lora+distill+delay16", [2.0])
    values = lora.recipe_values()
    assert (values["dmc_trainable"], values["dmc_merge_delay"]) == ("lora", 16)
    assert not lora.uses_zero_out and lora.train.total_iters(2.0) == paper.train.total_iters(2.0)
    with pytest.raises(ValueError, match=r"variant 'frozen'.*decision heads"):
        variant_preset(tiny, "frozen", [2.0])
    with pytest.raises(ValueError, match="unknown part 'delay'"):
        variant_flags("heads+delay")
    default = load_preset("default")
    assert variant_preset(default, "heads+distill+frozen+delay64", [2.0, 4.0]).rows()
    assert not variant_preset(default, "heads", [2.0]).train.calibrate_cr


def test_ablation_variant_of_the_efficient_recipe_matches_its_yaml():
    default = load_preset("default")
    efficient = variant_preset(default, "heads+distill+frozen+delay64+lr10+calibrated", [4.0])
    assert efficient.train.calibrate_cr and not efficient.uses_zero_out
    assert efficient.recipe_values() == default.recipe_values()


def test_ablation_table_has_a_row_per_variant_and_target():
    rows = [{"variant": v, "target_cr": cr, "tokens": 640, "wall_s": 12.0,
             "final_achieved_cr": cr - 0.1, "ppl": {"ppl_continuation": 11.0},
             "rise": {"ppl_continuation": 10.0}} for v in ("paper", "heads") for cr in (2.0, 4.0)]  # fmt: skip
    text = ablation_markdown({"preset": "tiny", "command": "cmd", "rows": rows})
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(lines) == 5 and lines[2].startswith(
        "| paper | 4x | 640 | 12 | 3.900 | – | – | 11.00 (+10.0%)"
    )
    assert dataclasses.is_dataclass(load_preset("tiny"))


LLAMA_LAYOUTS = {"7b": (4, 1), "13b": (8, 1), "70b": (8, 4)}


@pytest.mark.parametrize("size", sorted(LLAMA_LAYOUTS))
def test_llama_efficient_recipes_pass_the_trainers_checks(size, monkeypatch):
    import os
    import subprocess

    from megatron_dmc.model import config as model_config
    from megatron_dmc.training import validate

    root = RECIPES.parents[1]
    env = {"PATH": os.environ["PATH"], "PYTHON": "echo", "DATA_PATH": "/d", "LOAD": "/ck",
           "TOKENIZER_MODEL": "/t.model", "SAVE": "/run", "NNODES": "4"}  # fmt: skip
    script = root / "scripts" / f"retrofit_llama2_{size}.sh"
    done = subprocess.run([str(script), "--recipe", "efficient", "--train-iters", "7"], env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    argv = done.stdout.split(" -m megatron_dmc.train ")[1].split()
    assert argv[argv.index("--config") + 1] == f"configs/retrofit/llama2_{size}_efficient.yaml"
    argv[argv.index("--config") + 1] = str(root / argv[argv.index("--config") + 1])
    cfg = parse_args(argv)
    paper = parse_args(["--config", str(root / f"configs/retrofit/llama2_{size}.yaml"),
                        "--mock-data"])  # fmt: skip
    assert (cfg.dmc.dmc_decision_source, cfg.dmc.dmc_merge_delay) == ("heads", 64)
    assert (cfg.retrofit.dmc_distill_weight, cfg.retrofit.dmc_lm_loss_weight) == (1.0, 0.0)
    assert cfg.retrofit.dmc_trainable == "dmc-heads" and cfg.dmc.stages == ("retrofit", "finetune")
    assert vars(cfg.optim) == vars(paper.optim) and vars(cfg.parallel) == vars(paper.parallel)
    monkeypatch.setattr(validate, "cuda_available", lambda: True)  # a GPU cluster's checks
    monkeypatch.setattr(model_config, "cuda_available", lambda: True)
    monkeypatch.setattr(validate, "_check_files", lambda cfg: None)
    validate.validate(cfg, world_size=32)
    bad = subprocess.run([str(script), "--recipe", "fast"], env=env, capture_output=True,
                         text=True, check=False)  # fmt: skip
    assert bad.returncode == 2 and "--recipe takes paper or efficient" in bad.stderr
