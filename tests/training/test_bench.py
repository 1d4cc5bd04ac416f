"""The DMC-vs-vanilla training benchmark runs, times every model and compares like with like."""

from __future__ import annotations

import pytest

from megatron_dmc.compat import cuda_available
from megatron_dmc.training import bench

pytestmark = [pytest.mark.slow]


def test_bench_times_all_models_from_the_same_weights(capsys) -> None:
    argv = ["--model", "tiny_gqa", "--num-layers", "2", "--seq-length", "64"]
    result = bench.main(
        [*argv, "--warmup", "0", "--reps", "2", "--num-microbatches", "1", "--overheads"]
    )
    assert set(result["median_s"]) == {"vanilla", "vanilla_sdpa", "dmc", "transformers"}
    assert result["baseline"] == "vanilla_sdpa" and result["ratio"] > 0
    loss = result["first_lm_loss"]
    assert loss["vanilla_sdpa"] == pytest.approx(loss["vanilla"], rel=1e-6)
    assert loss["dmc"] == pytest.approx(loss["vanilla"], rel=1e-2)
    out = capsys.readouterr().out
    assert "goal DMC / vanilla_sdpa <= 1.15x" in out
    assert "DMC / transformers" in out and "CPU-s per token" in out
    overheads = result["overheads"]
    assert overheads["launch_cpu_s"] > 0 and overheads["checkpoint_mb"] > 0
    assert "overheads: launch" in out


def test_bench_refuses_bad_settings_before_any_work() -> None:
    with pytest.raises(ValueError, match="--reps must be >= 1"):
        bench.main(["--reps", "0"])
    if not cuda_available():
        with pytest.raises(ValueError, match="needs a GPU"):
            bench.main(["--bf16"])


def test_bench_times_distillation_at_the_same_shape(capsys) -> None:
    argv = ["--model", "tiny_gqa", "--num-layers", "2", "--seq-length", "64", "--distill"]
    result = bench.main([*argv, "--warmup", "0", "--reps", "1", "--num-microbatches", "2"])
    assert {"dmc", "dmc_distill", "dmc_lora_distill", "dmc_heads_lora_self"} <= set(
        result["median_s"]
    )
    loss = result["first_lm_loss"]
    assert loss["dmc_distill"] == loss["dmc_lora_distill"] == pytest.approx(loss["dmc"], rel=1e-6)
    held = result["state_bytes"]
    assert held["dmc"]["teacher"] == 0 and held["dmc_distill"]["teacher"] == held["dmc"]["weights"]
    assert held["dmc_distill"]["teacher_logits"] == 2 * 64 * 8192 * 4
    assert held["dmc_lora_distill"]["optimizer"] == 2 * held["dmc_lora_distill"]["trainable"]
    assert held["dmc_lora_distill"]["trainable"] < held["dmc"]["trainable"] / 10
    assert loss["dmc_heads_lora_self"] == pytest.approx(loss["vanilla"], rel=1e-2)
    self_taught = held["dmc_heads_lora_self"]
    assert self_taught["teacher"] == 0 and self_taught["teacher_logits"] == 2 * 64 * 8192 * 4
    assert "dmc_distill / DMC step time" in capsys.readouterr().out


def test_bench_times_the_efficient_recipe_against_transformers(capsys) -> None:
    """dmc_efficient: heads (zero-initialised: the first loss is vanilla's), delay 64, only
    the heads train (no optimizer state for the base), the student as its own teacher."""
    argv = ["--model", "tiny_gqa", "--num-layers", "2", "--seq-length", "96", "--efficient"]
    result = bench.main([*argv, "--warmup", "0", "--reps", "1", "--num-microbatches", "1"])
    assert {"dmc_efficient", "transformers"} <= set(result["median_s"])
    assert result["first_lm_loss"]["dmc_efficient"] == pytest.approx(
        result["first_lm_loss"]["vanilla"], rel=1e-5
    )
    held = result["state_bytes"]["dmc_efficient"]
    assert held["teacher"] == 0 and held["trainable"] < held["weights"] / 100
    assert held["optimizer"] == 2 * held["trainable"]
    assert "dmc_efficient / transformers CPU-s per token" in capsys.readouterr().out
