"""Distillation (frozen-copy teacher) and LoRA (q/k/v/o and MLP) under TP=2 x PP=2 train
the same model as one process: the curves (LM loss, KL, CR loss, achieved CR, gradient norm) agree within fp32
rounding, and the TP/PP-sharded adapters in the checkpoint equal the single process's.

The teacher runs through the same pipeline schedule (forward only) and its vocabulary-
parallel logits stay on the last stage; the adapters' A matrices are drawn for the whole
matrix and sliced, so every layout starts from the same adapters.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.training.helpers import TINY, metrics, run_tiny
from tests.training.test_retrofit import DISTILL, _weights

pytestmark = [pytest.mark.slow, pytest.mark.dist]

TP2_PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
RUNS = {
    "distill": DISTILL,
    "lora": [*DISTILL, "--dmc-trainable", "lora", "--dmc-lora-mlp"],
    "heads_lora": [*DISTILL, "--dmc-decision-source", "heads", "--dmc-trainable", "lora"],
}
"""Frozen-copy teacher (all weights; LoRA in channel mode), and the self teacher (heads)."""
KEYS = ("lm_loss", "kl_loss", "cr_loss", "achieved_cr", "grad_norm")


def _train_layouts(root: str, init: str) -> None:
    from tests.training.helpers import train

    for name, extra in RUNS.items():
        argv = [*TINY, "--save", f"{root}/{name}", "--load", init, *TP2_PP2, *extra]
        train(argv, keep_world=True)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, initial) -> Path:
    root = tmp_path_factory.mktemp("retrofit_layouts")
    run_distributed(_train_layouts, 4, args=(str(root), str(initial)), timeout_s=480)
    return root


@pytest.mark.parametrize("name", sorted(RUNS))
def test_tp2_pp2_matches_one_process(four_ranks, initial, tmp_path, name: str) -> None:
    one = tmp_path / "one"
    run_tiny(one, initial, *RUNS[name])
    got, want = metrics(four_ranks / name), metrics(one)
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want]
    for g, w in zip(got, want):
        for key in KEYS:
            assert (g.get(key) is None) == (w.get(key) is None), key
            if w.get(key) is not None:
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (key, g, w)
    sharded, single = _weights(four_ranks / name), _weights(one)
    assert sharded.keys() == single.keys()
    for key, tensor in single.items():
        # Adam moves an element with a near-zero gradient by lr x m / sqrt(v): a ratio of
        # tiny numbers, so the layouts' different reduction orders show as absolute
        # differences up to about lr x 1e-3 (lr = 1e-3) in weights that started equal.
        tolerance = 1e-5 * float(tensor.abs().max()) + 1e-6
        assert float((sharded[key] - tensor).abs().max()) <= tolerance, key
    assert any(k.endswith("lora_B") for k in single) == name.endswith("lora")
    assert torch.is_tensor(single["embedding.word_embeddings.weight"])
