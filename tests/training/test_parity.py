"""Tensor, pipeline and data parallel layouts train the same model: the curves of a whole
three-stage run (zero_out -> retrofit -> finetune) agree with one process within fp32
rounding, and a checkpoint saved at TP=2 resumes at TP=1 on the same curve.

Four ranks run every pair of TP=2, PP=2 and DP=2 (one spawn, three launches); each step
has 4 micro-batches (2 per rank with DP=2), so the pipeline always has several in flight.
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

TP2, PP2 = ["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]
LAYOUTS = {"tp2_pp2": [*TP2, *PP2], "tp2_dp2": [*TP2, "--save-interval", "3"], "pp2_dp2": PP2}
"""Four-process layouts, run one after the other in the same four ranks."""


def _train_layouts(root: str, init: str, layouts: dict[str, list[str]]) -> None:
    from tests.training.helpers import train

    for name, extra in layouts.items():
        train([*TINY, "--save", f"{root}/{name}", "--load", init, *extra], keep_world=True)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, initial) -> Path:
    root = tmp_path_factory.mktemp("layouts")
    run_distributed(_train_layouts, 4, args=(str(root), str(initial), LAYOUTS), timeout_s=420)
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
def test_layout_matches_single_process(four_ranks, reference, layout: str) -> None:
    _assert_close(curves(four_ranks / layout), reference[1])


def test_tp2_checkpoint_resumes_at_tp1_on_the_same_curve(four_ranks, reference, tmp_path) -> None:
    """Weights, Adam moments and progress reshard from TP=2 to TP=1 mid-retrofit."""
    got = run_tiny(tmp_path / "tp1", four_ranks / "tp2_dp2" / "iter_0000003")
    want = {key: values[3:] for key, values in reference[1].items()}
    _assert_close(got, want)
