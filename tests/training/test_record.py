"""Step records: per-(layer, KV head) CR reaches metrics.jsonl only with --log-per-head-cr."""

import torch

from megatron_dmc.schema.llama import LlamaShape
from megatron_dmc.training.loop import _loggable
from megatron_dmc.training.record import StepRecorder
from megatron_dmc.training.step import StepResult


def _record() -> dict:
    stats = dict(lm_loss_sum=6.0, tokens=3.0, cr_loss_sum=0.2, sequences=2.0, alpha_sum=4.0)
    alpha_LN = torch.tensor([[0.5, 0.0], [0.75, 0.25]])
    recorder = StepRecorder(LlamaShape.from_yaml("tiny_gqa"))
    return recorder.record({"iteration": 1}, StepResult(stats, 1.0), alpha_LN, 4, 2.0)


def test_per_head_cr_is_logged_only_when_asked():
    record = _record()
    assert record["layer_head_cr"] == [[2.0, 1.0], [4.0, 4.0 / 3.0]]
    assert _loggable(record, per_head=True)["layer_head_cr"] == record["layer_head_cr"]
    assert "layer_head_cr" not in _loggable(record, per_head=False)
    assert record["layer_cr"] == [1.0 / (1.0 - 0.25), 2.0]
