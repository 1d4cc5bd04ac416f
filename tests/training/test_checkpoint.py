"""Checkpoints: bitwise resume mid-stage, atomic saves, stage state, zeroed decision rows."""

from __future__ import annotations

import pytest
import torch
from megatron.core import dist_checkpointing

from megatron_dmc.convert.megatron_io import process_group_of_one
from tests.training.helpers import TINY, metrics, train_in_processes

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def test_resume_mid_retrofit_is_bitwise_identical(tmp_path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_in_processes(1, [*TINY, "--save", str(straight)])
    train_in_processes(1, [*TINY, "--save", str(resumed), "--train-iters", "3"])
    assert (resumed / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    train_in_processes(1, [*TINY, "--save", str(resumed)])
    want, got = metrics(straight), metrics(resumed)
    assert [m["iteration"] for m in got] == [1, 2, 3, 4, 5]
    for key in ("lm_loss", "cr_loss", "target_cr", "achieved_cr", "grad_norm", "lr"):
        assert [m.get(key) for m in got] == [m.get(key) for m in want], key


def test_zero_out_leaves_decision_rows_exactly_zero(tmp_path) -> None:
    save = tmp_path / "run"
    train_in_processes(1, [*TINY, "--save", str(save), "--dmc-stage", "zero_out"])
    common = dist_checkpointing.load_common_state_dict(str(save / "iter_0000002"))
    assert common["dmc_progress"]["stage"] == "zero_out" and common["dmc_progress"]["stage_done"]
    with process_group_of_one():
        tensors = dist_checkpointing.load_plain_tensors(str(save / "iter_0000002"))
    qkv = tensors["decoder.layers.self_attention.linear_qkv.weight"]  # [L, (2+2)*2*16, 64]
    d, per_group = 16, 2
    rows = [(g * (per_group + 2) + h) * d + d - 1 for g in range(2) for h in range(per_group + 1)]
    assert torch.count_nonzero(qkv[:, rows]) == 0
    value_rows = [(g * (per_group + 2) + per_group + 1) * d + d - 1 for g in range(2)]
    assert torch.count_nonzero(qkv[:, value_rows]) > 0
