"""The recipes: Llama 2 launchers and YAMLs carry the paper's settings and pass every check
of the trainer at their layout; the tiny recipe's pieces (tokenizer, summary) work."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from megatron_dmc.model import config as model_config
from megatron_dmc.training import summary, validate
from megatron_dmc.training.arguments import parse_args
from megatron_dmc.training.tiny_data import VOCAB_SIZE, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
LAYOUTS = {"7b": (4, 1, True), "13b": (8, 1, True), "70b": (8, 4, False)}
"""TP, PP, sequence parallel per model size."""

ENV = {"DATA_PATH": "/d/corpus", "TOKENIZER_MODEL": "/t.model", "LOAD": "/ck", "SAVE": "/run"}


def _launch(size: str, env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    script = ROOT / "scripts" / f"retrofit_llama2_{size}.sh"
    full_env = {"PATH": os.environ["PATH"], "PYTHON": "echo", **env}
    return subprocess.run(
        [str(script), *flags], env=full_env, capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize("size", sorted(LAYOUTS))
def test_llama_launcher_passes_paths_target_and_layout(size: str, monkeypatch) -> None:
    tp, pp, sp = LAYOUTS[size]
    env = {**ENV, "TARGET_CR": "8", "NNODES": "4", "NODE_RANK": "2", "MASTER_ADDR": "n0"}
    done = _launch(size, env, "--train-iters", "7")
    assert done.returncode == 0, done.stderr
    launcher, argv = done.stdout.split(" -m megatron_dmc.train ")
    assert "--nnodes 4 --node-rank 2 --nproc-per-node 8 --master-addr n0" in launcher
    cfg = parse_args(argv.split())
    assert (cfg.data.data_path, cfg.checkpoint.load, cfg.checkpoint.save) == (
        "/d/corpus",
        "/ck",
        "/run",
    )
    assert (cfg.dmc.dmc_target_cr, cfg.dmc.dmc_ramp_iters, cfg.batch.train_iters) == (8, 42000, 7)
    sizes = (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    assert sizes == (tp, pp) and cfg.model.sequence_parallel is sp
    monkeypatch.setattr(validate, "cuda_available", lambda: True)  # a GPU cluster's checks
    monkeypatch.setattr(model_config, "cuda_available", lambda: True)
    monkeypatch.setattr(validate, "_check_files", lambda cfg: None)
    validate.validate(cfg, world_size=32)


@pytest.mark.parametrize("size", sorted(LAYOUTS))
def test_llama_yaml_has_the_paper_hyperparameters(size: str) -> None:
    cfg = parse_args(
        ["--config", str(ROOT / f"configs/retrofit/llama2_{size}.yaml"), "--mock-data"]
    )
    o, b, d = cfg.optim, cfg.batch, cfg.dmc
    assert (o.adam_beta1, o.adam_beta2, o.adam_eps, o.weight_decay, o.clip_grad) == (
        0.9, 0.95, 1e-5, 0.1, 1.0,
    )  # fmt: skip
    assert (o.lr, o.min_lr) == (1.5e-5 if size == "70b" else 3e-5, 3e-6)
    assert (b.global_batch_size, b.seq_length, cfg.model.bf16) == (1024, 4096, True)
    assert (d.dmc_window_size, d.dmc_temperature, d.dmc_init_val, d.dmc_target_cr) == (
        12, 0.1, 5.0, 4.0,
    )  # fmt: skip
    assert (d.dmc_zero_out_iters, d.dmc_zero_out_anneal_iters, d.dmc_finetune_iters) == (
        250, 200, 2000,
    )  # fmt: skip
    assert d.dmc_ramp_iters == 18000


def test_llama_launcher_refuses_missing_paths_and_bad_worlds() -> None:
    done = _launch("7b", {"DATA_PATH": "/d"})
    assert done.returncode == 2 and "set TOKENIZER_MODEL LOAD SAVE" in done.stderr
    assert "usage:" in done.stderr
    done = _launch("70b", {**ENV, "GPUS_PER_NODE": "8"})
    assert done.returncode == 2 and "not a multiple of TP x PP = 32" in done.stderr


def test_tiny_recipe_yaml_is_valid_at_tp2() -> None:
    cfg = parse_args(["--config", str(ROOT / "configs/retrofit/tiny_cpu.yaml"), "--mock-data"])
    assert cfg.parallel.tensor_model_parallel_size == 2
    validate.validate(cfg, world_size=2)


def test_tiny_tokenizer_fits_the_tiny_model(tmp_path) -> None:
    from megatron_dmc.data.tokenizer import HFTokenizer

    text = ["The quick brown fox jumps over the lazy dog near the river bank."] * 20
    tokenizer = HFTokenizer(train_tokenizer(text, tmp_path, vocab_size=64))
    assert tokenizer.vocab_size <= 64 <= VOCAB_SIZE
    ids = tokenizer.encode(text[0])
    assert tokenizer.decode(ids) == text[0] and tokenizer.eod_id not in ids


def test_summary_reads_the_run_and_judges_the_target(tmp_path, capsys) -> None:
    records = [
        {"iteration": 1, "stage": "zero_out", "achieved_cr": None},
        {"iteration": 2, "stage": "finetune", "achieved_cr": 3.3, "target_cr": 4.0},
        {"iteration": 3, "stage": "finetune", "achieved_cr": 3.7, "target_cr": 4.0, "layer_cr": [2.0]},
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert summary.main([str(tmp_path)]) == 0
    assert "3.700 vs target 4.000 (-7.5%): reached" in capsys.readouterr().out
    assert summary.main([str(tmp_path), "--last", "2"]) == 1
    assert "3.500 vs target 4.000 (-12.5%): NOT reached" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--save directory"):
        summary.main([str(tmp_path / "nope")])
