"""Checkpoints and run control: bitwise resume, atomic saves, zeroed decision rows, the
non-finite loss stop, and activation recompute (bit-identical to none)."""

from __future__ import annotations

import json

import pytest
import torch
from megatron.core import dist_checkpointing

from megatron_dmc.convert.megatron_io import process_group_of_one
from megatron_dmc.schema.checkpoint import METADATA_KEY
from megatron_dmc.training import checkpoint as ckpt
from megatron_dmc.training.record import NonFiniteLossError
from tests.training.helpers import KEYS, metrics, run_tiny, save_initial_checkpoint

pytestmark = [pytest.mark.slow]

TRACKER = "latest_checkpointed_iteration.txt"


def _assert_identical(got: dict, want: dict) -> None:
    for key in ("iteration", *KEYS):
        assert got[key] == want[key], (key, got[key], want[key])


def _tail(curve: dict, n: int) -> dict:
    return {key: values[-n:] for key, values in curve.items()}


def test_resume_mid_retrofit_is_bitwise_identical(initial, reference, tmp_path) -> None:
    save = tmp_path / "run"
    run_tiny(save, initial, "--train-iters", "3")
    assert (save / TRACKER).read_text().strip() == "3"
    _assert_identical(run_tiny(save, initial), reference[1])


def _failing_save(real_save, fail_at: str):
    def save(state, directory, *args, **kwargs):
        real_save(state, directory, *args, **kwargs)
        if directory.endswith(fail_at):
            for shard in sorted(p for p in ckpt.Path(directory).iterdir() if p.is_file())[::2]:
                shard.unlink()
            raise RuntimeError("simulated crash mid-save")

    return save


def test_failed_save_leaves_the_previous_checkpoint(initial, reference, tmp_path, monkeypatch):
    save = tmp_path / "run"
    failing = _failing_save(dist_checkpointing.save, "iter_0000003.tmp")
    monkeypatch.setattr(ckpt.dist_checkpointing, "save", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tiny(save, initial, "--save-interval", "1")
    monkeypatch.undo()
    assert (save / TRACKER).read_text().strip() == "2"
    assert (save / "iter_0000003.tmp").is_dir() and not (save / "iter_0000003").exists()
    assert ckpt.read_common(save)["dmc_progress"]["iteration"] == 2
    _assert_identical(
        _tail(run_tiny(save, initial, "--save-interval", "1"), 3), _tail(reference[1], 3)
    )
    assert not (save / "iter_0000003.tmp").exists()


def test_zero_out_leaves_decision_rows_exactly_zero(reference) -> None:
    directory = reference[0] / "iter_0000002"
    progress = dist_checkpointing.load_common_state_dict(str(directory))["dmc_progress"]
    assert progress["stage"] == "zero_out" and progress["stage_done"]
    with process_group_of_one():
        tensors = dist_checkpointing.load_plain_tensors(str(directory))
    qkv_LRI = tensors["decoder.layers.self_attention.linear_qkv.weight"]  # [L, 2*(2+2)*16, 64]
    d, per_group = 16, 2
    rows = [(g * (per_group + 2) + h) * d + d - 1 for g in range(2) for h in range(per_group + 1)]
    assert torch.count_nonzero(qkv_LRI[:, rows]) == 0
    value_rows = [(g * (per_group + 2) + per_group + 1) * d + d - 1 for g in range(2)]
    assert torch.count_nonzero(qkv_LRI[:, value_rows]) > 0


def test_trained_cr_per_layer_and_head_is_in_the_checkpoint(reference) -> None:
    common = ckpt.read_common(reference[0])
    layer_head_cr = common[METADATA_KEY]["dmc"]["layer_head_cr"]
    assert len(layer_head_cr) == 4 and all(len(heads) == 2 for heads in layer_head_cr)
    stored = json.loads((reference[0] / "iter_0000005" / ckpt.CR_FILE).read_text())
    assert stored["layer_head_cr"] == layer_head_cr
    alpha_LN = 1.0 - 1.0 / torch.tensor(layer_head_cr, dtype=torch.float64)
    layer_cr = (1.0 / (1.0 - alpha_LN.mean(dim=1))).tolist()
    assert layer_cr == pytest.approx(metrics(reference[0])[-1]["layer_cr"], rel=1e-12)


def test_non_finite_loss_stops_naming_step_and_layer(tmp_path) -> None:
    poisoned = save_initial_checkpoint(tmp_path / "init", nan_in_layer=2)
    save = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"iteration 1 \(stage zero_out\).*layer 2"):
        run_tiny(save, poisoned)
    assert not (save / TRACKER).exists()


def test_selective_recompute_is_bit_identical(initial, reference, tmp_path) -> None:
    got = run_tiny(tmp_path / "run", initial, "--recompute-granularity", "selective")
    _assert_identical(got, reference[1])


def test_full_recompute_in_zero_out_is_bit_identical(initial, reference, tmp_path) -> None:
    extra = ["--recompute-granularity", "full", "--dmc-stage", "zero_out"]
    got = run_tiny(tmp_path / "run", initial, *extra)
    _assert_identical(got, {key: values[:2] for key, values in reference[1].items()})
