"""Distillation and trainable sets through the trainer (one process): the KL starts at 0,
a distilled run resumes bitwise mid-stage, frozen weights stay bit-identical, only trainable
parameters carry optimizer state, LoRA checkpoints export merged, and bad settings stop the
launch before any work.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from megatron.core import dist_checkpointing

from megatron_dmc.convert.megatron_io import MegatronCheckpoint, process_group_of_one
from megatron_dmc.schema.checkpoint import resolve_iteration_dir
from megatron_dmc.training.arguments import parse_args
from tests.training.helpers import TINY, curves, metrics, run_tiny, save_initial_checkpoint

DISTILL = ["--dmc-distill-weight", "1"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of the newest checkpoint under `path`, by checkpoint key."""
    directory = str(resolve_iteration_dir(path))
    with process_group_of_one():
        meta = dist_checkpointing.load_tensors_metadata(directory)
        request = {k: v for k, v in meta.items() if not k.startswith("optimizer.")}
        for value in request.values():
            value.data = torch.empty(value.global_shape, dtype=value.dtype)
        loaded = dist_checkpointing.load(request, directory, validate_access_integrity=False)
    return {k: v for k, v in loaded.items() if k in request}


def _optimizer_params(path: Path) -> set[str]:
    directory = str(resolve_iteration_dir(path))
    with process_group_of_one():
        keys = dist_checkpointing.load_tensors_metadata(directory)
    prefix = "optimizer.state.exp_avg."
    return {k[len(prefix) :] for k in keys if k.startswith(prefix)}


def _zeroed_decision_rows(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` with channel D-1 of every q and k head zeroed, as zero_out leaves them
    (tiny_gqa: 4 heads over 2 groups, head dim 16: per group 2 q + 1 k + 1 v heads)."""
    out = dict(weights)
    key = "decoder.layers.self_attention.linear_qkv.weight"
    qkv = out[key].clone()
    qkv.view(qkv.shape[0], 2, 4, 16, -1)[:, :, :3, 15] = 0.0
    out[key] = qkv
    return out


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, initial) -> Path:
    save = tmp_path_factory.mktemp("distill") / "run"
    run_tiny(save, initial, *DISTILL)
    return save


def test_distillation_starts_at_zero_kl_and_logs_both_losses(distilled, reference):
    records = metrics(distilled)
    assert records[0]["kl_loss"] <= 1e-6  # the teacher is the starting weights
    assert all(r["kl_loss"] > 0 for r in records[2:])
    assert records[0]["lm_loss"] == pytest.approx(reference[1]["lm_loss"][0], rel=1e-6)
    assert "kl_loss" not in metrics(reference[0])[0]


def test_distilled_run_resumes_bitwise_mid_retrofit(distilled, initial, tmp_path):
    save = tmp_path / "resumed"
    run_tiny(save, initial, *DISTILL, "--train-iters", "3")
    got = run_tiny(save, initial, *DISTILL)
    want = curves(distilled)
    assert got["iteration"] == want["iteration"]
    assert {k: v for k, v in got.items()} == want


def test_teacher_chunks_give_the_same_step(distilled, initial, tmp_path):
    """One micro-batch per teacher pass (gradients accumulated across four schedule calls,
    finalised once) trains as the whole step in one pass."""
    got = run_tiny(tmp_path / "chunked", initial, *DISTILL, "--dmc-distill-chunk", "1")
    want = curves(distilled)
    for key in ("lm_loss", "cr_loss", "grad_norm", "achieved_cr"):
        for a, b in zip(got[key], want[key]):
            assert (a is None) == (b is None)
            assert a is None or a == pytest.approx(b, rel=1e-6, abs=1e-9), (key, got, want)


@pytest.mark.parametrize("trainable", ["attention", "lora"])
def test_frozen_weights_stay_bit_identical_and_carry_no_optimizer_state(
    trainable, initial, tmp_path
):
    save = tmp_path / trainable
    run_tiny(save, initial, "--dmc-trainable", trainable, *DISTILL)
    before, after = _zeroed_decision_rows(_weights(initial)), _weights(save)
    attention = ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight")
    trains = {k for k in before if trainable == "attention" and k.endswith(attention)}
    assert trains or trainable == "lora"
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor) != (key in trains), key
    adapters = {k for k in after if k.endswith(("lora_A", "lora_B"))}
    assert bool(adapters) == (trainable == "lora")
    assert _optimizer_params(save) == (trains | adapters)


def test_lora_checkpoint_exports_with_adapters_folded_in(initial, tmp_path):
    save = tmp_path / "lora"
    run_tiny(save, initial, "--dmc-trainable", "lora", "--dmc-lora-rank", "2", "--lr", "5e-2")
    saved = _weights(save)
    scale = 16.0 / 2
    qkv = "decoder.layers.self_attention.linear_qkv."
    b = saved[qkv + "lora_B"]
    assert b.abs().max() > 0  # the adapters trained
    want = saved[qkv + "weight"] + scale * b @ saved[qkv + "lora_A"]
    with MegatronCheckpoint(save) as ckpt:
        from megatron_dmc.convert.mapping import entries

        entry = next(
            e for e in entries(ckpt.shape, layers=[1]) if "linear_qkv.weight" in e.megatron
        )
        got = ckpt.read([entry])[entry.megatron]
    assert (got - want[1]).abs().max() <= 1e-6 * want[1].abs().max()


HEADS = ["--dmc-decision-source", "heads"]


@pytest.mark.parametrize("trainable", ["dmc-heads", "lora"])
def test_heads_mode_distills_from_itself_with_compression_off(trainable, initial, tmp_path):
    """A frozen base with decision heads: the teacher is the student with compression off
    (no --load needed for it), the KL is the only task loss, and only the heads (and the
    adapters) change."""
    save = tmp_path / trainable
    extra = [*HEADS, "--dmc-trainable", trainable, *DISTILL, "--dmc-lm-loss-weight", "0"]
    run_tiny(save, initial, *extra)
    records = metrics(save)
    assert [r["stage"] for r in records] == ["retrofit", "retrofit", "finetune"]
    assert all(0 < r["kl_loss"] < 0.1 for r in records)
    before, after = _weights(initial), _weights(save)
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key
    trained = {k for k in after if k not in before}
    assert any("dmc_decision_proj" in k for k in trained)
    assert _optimizer_params(save) == trained
    assert any(k.endswith("lora_B") for k in trained) == (trainable == "lora")


def _refused(argv: list[str], match: str) -> None:
    from tests.training.helpers import train

    with pytest.raises(ValueError, match=match):
        train(argv)


def test_bad_settings_are_refused_before_any_work(initial, tmp_path):
    with pytest.raises(ValueError, match="dmc-decision-source heads"):
        parse_args([*TINY, "--dmc-trainable", "dmc-heads"])
    with pytest.raises(ValueError, match="lora-rank must be > 0"):
        parse_args([*TINY, "--dmc-trainable", "lora", "--dmc-lora-rank", "0"])
    with pytest.raises(ValueError, match="give --load or --dmc-teacher-load"):
        parse_args([*TINY, *DISTILL])
    with pytest.raises(ValueError, match="not to --dmc-stage plain"):
        parse_args(
            [
                "--model",
                "tiny_gqa",
                "--mock-data",
                "--dmc-stage",
                "plain",
                "--plain-iters",
                "2",
                *DISTILL,
                "--load",
                str(initial),
            ]
        )
    other = save_initial_checkpoint(tmp_path / "mha", "tiny_mha")
    argv = [*TINY, "--save", str(tmp_path / "run"), "--load", str(initial), *DISTILL]
    _refused([*argv, "--dmc-teacher-load", str(other)], "teacher checkpoint")
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_continues_only_with_its_trainable_set(initial, tmp_path):
    save = tmp_path / "run"
    run_tiny(save, initial, "--dmc-trainable", "lora", "--train-iters", "1")
    _refused([*TINY, "--save", str(save)], "holds LoRA adapters")
    run_tiny(tmp_path / "attn", initial, "--dmc-trainable", "attention", "--train-iters", "1")
    _refused([*TINY, "--save", str(tmp_path / "attn")], "optimizer state is for")
