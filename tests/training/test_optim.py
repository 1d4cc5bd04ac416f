"""The CPU optimizer: live param groups, per-row update scaling, moment restarts, and
non-finite gradients (not applied; the first one located)."""

import math

import pytest
import torch

from megatron_dmc.distributed import destroy_distributed, initialize_distributed, seed_everything
from megatron_dmc.model import build_model
from megatron_dmc.model.qkv import decision_row_selectors
from megatron_dmc.schema.llama import LlamaShape
from megatron_dmc.training import validate as validate_module
from megatron_dmc.training.arguments import parse_args
from megatron_dmc.training.config import OptimizerArgs
from megatron_dmc.training.optim import (
    CpuAdamW,
    first_non_finite_grad,
    restart_decision_moments,
    set_decision_lr_mult,
    stage_lr_scheduler,
)
from megatron_dmc.training.stages import plan


@pytest.fixture(scope="module", autouse=True)
def single_process_world():
    initialize_distributed(seed=3)
    yield
    destroy_distributed()


def _model_and_optimizer(lr: float = 1e-2):
    seed_everything(7)
    model = build_model(LlamaShape.from_yaml("tiny_gqa"), "vanilla")
    return model, CpuAdamW(model, OptimizerArgs(lr=lr, min_lr=0.0, clip_grad=0.0))


def _step_with_seeded_grads(model, optimizer, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.main_grad = torch.randn(param.shape, generator=generator)
    optimizer.step()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def test_learning_rate_set_after_load_state_dict_reaches_the_update():
    model, optimizer = _model_and_optimizer()
    _step_with_seeded_grads(model, optimizer)
    optimizer.load_state_dict(optimizer.state_dict())
    for group in optimizer.param_groups:  # what the LR scheduler does every step
        group["lr"] = 0.0
    before = _snapshot(model)
    _step_with_seeded_grads(model, optimizer, seed=1)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_decision_lr_mult_scales_only_the_decision_rows():
    deltas = []
    for mult in (1.0, 7.0):
        model, optimizer = _model_and_optimizer()
        selectors = decision_row_selectors(model)
        set_decision_lr_mult(optimizer, selectors, mult)
        before = _snapshot(model)
        _step_with_seeded_grads(model, optimizer)
        deltas.append({n: p.detach() - before[n] for n, p in model.named_parameters()})
        rows = {
            name: view
            for (param, view) in selectors
            for name, p in model.named_parameters()
            if p is param
        }
    for name, plain in deltas[0].items():
        scaled = deltas[1][name]
        if name not in rows:
            assert torch.equal(scaled, plain), name
            continue
        view = rows[name]
        torch.testing.assert_close(view(scaled), 7.0 * view(plain), rtol=1e-5, atol=1e-9)
        untouched_scaled, untouched_plain = scaled.clone(), plain.clone()
        view(untouched_scaled).zero_()
        view(untouched_plain).zero_()
        assert torch.equal(untouched_scaled, untouched_plain), name


def test_restart_moments_zeroes_only_the_decision_rows():
    model, optimizer = _model_and_optimizer()
    _step_with_seeded_grads(model, optimizer)
    selectors = decision_row_selectors(model)
    restart_decision_moments(optimizer, selectors)
    for param, view in selectors:
        state = optimizer.optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.all(view(state[key]) == 0)
            assert int((state[key] != 0).sum()) == state[key].numel() - view(state[key]).numel()


def test_decision_lr_mult_is_refused_on_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(validate_module, "cuda_available", lambda: True)
    args = [
        "--model",
        "tiny_gqa",
        "--mock-data",
        "--seq-length",
        "32",
        "--save",
        str(tmp_path / "run"),
    ]
    with pytest.raises(ValueError, match="dmc-decision-lr-mult"):
        validate_module.validate(parse_args([*args, "--dmc-decision-lr-mult", "10"]), world_size=1)


def _lrs(stage, optim_args: OptimizerArgs, warmup: int, start: int = 0) -> list[float]:
    _, optimizer = _model_and_optimizer(lr=optim_args.lr)
    scheduler = stage_lr_scheduler(optimizer, stage, optim_args, start, warmup)
    lrs = []
    for _ in range(stage.iters - start):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(1)
    return lrs


def test_warmup_ramps_from_zero_then_keeps_the_stage_schedule(tmp_path):
    cfg = parse_args(["--model", "tiny_gqa", "--mock-data", "--save", str(tmp_path),
                      "--dmc-stage", "all", "--dmc-zero-out-iters", "6",
                      "--dmc-zero-out-anneal-iters", "4", "--dmc-finetune-iters", "8",
                      "--lr", "1e-3", "--min-lr", "1e-4"])  # fmt: skip
    zero_out, *_, finetune = plan(cfg.dmc)
    assert _lrs(zero_out, cfg.optim, 4) == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert _lrs(zero_out, cfg.optim, 4, start=3) == pytest.approx([7.5e-4, 1e-3, 1e-3])
    assert _lrs(zero_out, cfg.optim, 0)[0] == pytest.approx(1e-3)
    decay = _lrs(finetune, cfg.optim, 2)
    assert decay[:3] == pytest.approx([0, 5e-4, 1e-3]) and decay[-1] < decay[3] < 1e-3


def test_warmup_must_fit_in_the_opening_stage(tmp_path):
    args = ["--model", "tiny_gqa", "--mock-data", "--seq-length", "32", "--save",
            str(tmp_path / "run"), "--dmc-stage", "finetune", "--dmc-finetune-iters", "5"]  # fmt: skip
    validate_module.validate(parse_args([*args, "--lr-warmup-iters", "4"]), world_size=1)
    with pytest.raises(ValueError, match="lr-warmup-iters 5 must be below 5: the finetune"):
        validate_module.validate(parse_args([*args, "--lr-warmup-iters", "5"]), world_size=1)
    plain = [*args[:-4], "--dmc-stage", "plain", "--plain-iters", "6", "--plain-decay-iters", "2"]
    validate_module.validate(parse_args([*plain, "--lr-warmup-iters", "3"]), world_size=1)
    with pytest.raises(
        ValueError, match="must be below 4: the plain stage has 6 steps, the last 2"
    ):
        validate_module.validate(parse_args([*plain, "--lr-warmup-iters", "4"]), world_size=1)
    with pytest.raises(ValueError, match="must be >= 0"):
        parse_args([*args, "--lr-warmup-iters", "-1"])


def test_non_finite_gradient_is_not_applied():
    model, optimizer = _model_and_optimizer()
    before = _snapshot(model)
    for i, param in enumerate(model.parameters()):
        param.main_grad = torch.full_like(param, float("nan") if i == 3 else 0.5)
    applied, norm, _ = optimizer.step()
    assert not applied and math.isnan(norm)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not optimizer.optimizer.state  # AdamW's moments untouched too


def test_first_non_finite_grad_names_the_front_most_place():
    model, _ = _model_and_optimizer()
    for param in model.parameters():
        param.main_grad = torch.zeros_like(param)
    assert first_non_finite_grad(model) is None
    model.decoder.layers[3].mlp.linear_fc2.weight.main_grad[0, 0] = float("inf")
    model.decoder.layers[1].self_attention.linear_qkv.weight.main_grad[0, 0] = float("nan")
    assert first_non_finite_grad(model) == "layer 1 (self_attention.linear_qkv.weight)"
    model.embedding.word_embeddings.weight.main_grad[0, 0] = float("nan")
    assert first_non_finite_grad(model) == "embedding.word_embeddings.weight"
