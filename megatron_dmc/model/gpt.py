"""`DMCGPTModel`: Megatron-Core's GPTModel that also returns its DMC decision sums.

Legend: S sequence, B batch, H hidden size.

Forward returns `(output, DecisionSums)` on every pipeline stage. On the last stage
`output` is what GPTModel returns (per-token losses with labels, else logits) and the
sums cover the whole model: feed them to `megatron_dmc.ops.compression_loss`. On
other stages `output` is the hidden states with one extra sequence row carrying the
running sum, so pipeline schedules must be called with `seq_length + 1`
(`pipeline_seq_length`).
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from megatron_dmc.model.attention import DMCSelfAttention
from megatron_dmc.model.decisions import (
    DecisionCollector,
    DecisionSums,
    append_carry_row,
    split_carry_row,
)


def pipeline_seq_length(seq_length: int, pipeline_model_parallel_size: int) -> int:
    """The `seq_length` to give `get_forward_backward_func()` for a DMC model."""
    return seq_length + 1 if pipeline_model_parallel_size > 1 else seq_length


class DMCGPTModel(GPTModel):
    """GPTModel whose DMC attentions report to this model's own `DecisionCollector`."""

    def __init__(self, *args, noise_seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.config.sequence_parallel and self.config.pipeline_model_parallel_size > 1:
            raise ValueError(
                "DMC with sequence parallel and pipeline parallel together is not "
                "supported yet (the decision carry row assumes whole sequences)"
            )
        self.collector = DecisionCollector(noise_seed)
        self._carried_B: torch.Tensor | None = None
        layers = [m for m in self.modules() if isinstance(m, DMCSelfAttention)]
        assert layers, "DMCGPTModel needs a layer spec with DMC attention"
        for layer in layers:
            layer.collector = self.collector

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "input_tensor should only be length 1 for gpt"
            input_tensor = input_tensor[0]
        self._carried_B = None
        if input_tensor is not None and not self.pre_process:
            input_tensor, self._carried_B = split_carry_row(input_tensor)
        super().set_input_tensor(input_tensor)

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, DecisionSums]:
        self.collector.begin_forward()
        output = super().forward(*args, **kwargs)
        sum_B = self.collector.local_sum_B()
        if self._carried_B is not None:
            sum_B = sum_B + self._carried_B.to(sum_B.device)
        count = self.config.num_layers * self.config.num_query_groups * self.collector.length
        if not self.post_process:
            output = append_carry_row(output, sum_B)
        return output, DecisionSums(sum_B, count)
