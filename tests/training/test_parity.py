"""Tensor, pipeline and data parallel layouts train the same model: the curves of a whole
three-stage run (zero_out -> retrofit -> finetune) agree with one process within fp32
rounding, and a checkpoint saved at TP=2 resumes at TP=1 on the same curve.

The Gumbel noise is keyed by (seed, step, global micro-batch, layer) and drawn for all
KV heads, so every layout sees the same noise: with DP=2 rank r's micro-batch m is global
micro-batch 2m + r, exactly the samples of the single process's micro-batch 2m + r.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist_utils import run_distributed
from tests.training.helpers import TINY, curves, run_tiny

pytestmark = [pytest.mark.slow, pytest.mark.dist]

LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2", "--save-interval", "3"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "dp2": [],
}
"""Two-process layouts, run one after the other in the same two ranks."""


def _train_layouts(root: str, init: str, layouts: dict[str, list[str]]) -> None:
    from tests.training.helpers import train

    for name, extra in layouts.items():
        train([*TINY, "--save", f"{root}/{name}", "--load", init, *extra], keep_world=True)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, initial) -> Path:
    root = tmp_path_factory.mktemp("layouts")
    run_distributed(_train_layouts, 2, args=(str(root), str(initial), LAYOUTS), timeout_s=300)
    return root


def _assert_close(got: dict, want: dict, rel: float = 1e-5) -> None:
    assert got["iteration"] == want["iteration"]
    for key in want:
        for a, b in zip(got[key], want[key]):
            assert (a is None) == (b is None), key
            if a is not None:
                assert a == pytest.approx(b, rel=rel, abs=1e-7), (key, got[key], want[key])


def test_reference_runs_all_stages_with_an_active_cr_loss(reference) -> None:
    _, want = reference
    assert want["iteration"] == [1, 2, 3, 4, 5]
    assert want["cr_loss"][:2] == [None, None] and want["target_cr"][:2] == [None, None]
    assert want["target_cr"][2:] == [1.0, 1.5, 2.0]
    assert all(v > 0 for v in want["cr_loss"][3:])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(two_ranks, reference, layout: str) -> None:
    _assert_close(curves(two_ranks / layout), reference[1])


def test_tp2_checkpoint_resumes_at_tp1_on_the_same_curve(two_ranks, reference, tmp_path) -> None:
    """Weights, Adam moments and progress reshard from TP=2 to TP=1 mid-retrofit."""
    got = run_tiny(tmp_path / "tp1", two_ranks / "tp2" / "iter_0000003")
    want = {key: values[3:] for key, values in reference[1].items()}
    _assert_close(got, want)


def _tp2_pp2(root: str, init: str) -> None:
    from tests.training.helpers import train

    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    train([*TINY, "--save", root, "--load", init, *layout])


def test_tp2_by_pp2_matches_single_process(initial, reference, tmp_path) -> None:
    run_distributed(_tp2_pp2, 4, args=(str(tmp_path / "run"), str(initial)), timeout_s=300)
    _assert_close(curves(tmp_path / "run"), reference[1])
