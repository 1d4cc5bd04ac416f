"""Tensor, pipeline and data parallel layouts train the same model: the loss curves of a
whole three-stage run (zero_out -> retrofit -> finetune) agree within fp32 rounding.

The Gumbel noise is keyed by (seed, step, micro-batch, layer, data-parallel rank) and
drawn for all KV heads, so TP and PP layouts see the same noise; DP does not (each data
rank draws its own), so the DP comparison covers the noise-free zero_out stage.
"""

from __future__ import annotations

import pytest

from tests.training.helpers import TINY, curve, save_initial_checkpoint, train_in_processes

pytestmark = [pytest.mark.slow, pytest.mark.dist]


@pytest.fixture(scope="module")
def initial(tmp_path_factory) -> str:
    """Every layout starts from the same weights (Megatron's initialisation depends on the
    pipeline split): a vanilla checkpoint, loaded weights-only."""
    return str(save_initial_checkpoint(tmp_path_factory.mktemp("init") / "ckpt"))


def _run(tmp_path, name: str, world: int, extra: list[str], init: str, argv=TINY) -> dict:
    save = tmp_path / name
    argv = [*argv, "--global-batch-size", "4", "--save", str(save), "--load", init, *extra]
    train_in_processes(world, argv)
    return {key: curve(save, key) for key in ("lm_loss", "cr_loss", "achieved_cr")}


def _assert_close(got: dict, want: dict, rel: float = 1e-5) -> None:
    assert len(got["lm_loss"]) == len(want["lm_loss"]) == 5
    for key in got:
        for a, b in zip(got[key], want[key]):
            assert (a is None) == (b is None), key
            if a is not None:
                assert a == pytest.approx(b, rel=rel, abs=1e-7), (key, got[key], want[key])


@pytest.fixture(scope="module")
def single(tmp_path_factory, initial) -> dict[str, list]:
    return _run(tmp_path_factory.mktemp("tp1"), "tp1", 1, [], initial)


def test_tensor_parallel_matches_single_process(tmp_path, single, initial) -> None:
    extra = ["--tensor-model-parallel-size", "2"]
    _assert_close(_run(tmp_path, "tp2", 2, extra, initial), single)


def test_pipeline_parallel_matches_single_process(tmp_path, single, initial) -> None:
    extra = ["--pipeline-model-parallel-size", "2"]
    _assert_close(_run(tmp_path, "pp2", 2, extra, initial), single)


def test_cr_loss_is_active_and_identical_across_layouts(single) -> None:
    assert single["cr_loss"][:2] == [None, None]
    assert all(v is not None and v > 0 for v in single["cr_loss"][3:])


def test_data_parallel_matches_single_process_in_zero_out(tmp_path, initial) -> None:
    argv = [*TINY, "--dmc-stage", "zero_out"]
    one = _run(tmp_path, "dp1", 1, [], initial, argv)
    two = _run(tmp_path, "dp2", 2, [], initial, argv)
    for a, b in zip(two["lm_loss"], one["lm_loss"]):
        assert a == pytest.approx(b, rel=1e-5)
