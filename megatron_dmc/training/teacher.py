"""The distillation teacher: the original model's logits for every micro-batch of a step.

Legend: b micro-batch size, s sequence length, V vocabulary entries on this TP rank.

Two kinds, chosen by `RetrofitArgs`:
- the student itself with compression off (`compression_off`): every DMC layer runs plain
  attention of the same weights and LoRA adapters are bypassed. Exact only while the base
  weights are the original's: a frozen base (dmc-heads, lora) with the heads decision source;
- a frozen copy of the starting weights, a model of the student's shape loaded from
  --dmc-teacher-load (default --load) whose DMC layers always run with compression off (plain
  attention through SDPA): one more set of weights in memory, no gradients, no optimizer
  state.

Either runs through the same Megatron pipeline schedule as the student (forward_only); its
logits stay on the last pipeline stage, one [b, s, V] tensor per micro-batch of the step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_dmc.compat import cpu_device_mode
from megatron_dmc.model.attention import DMCSelfAttention
from megatron_dmc.model.builder import build_model
from megatron_dmc.model.gpt import DMCGPTModel, pipeline_seq_length
from megatron_dmc.model.lora import adapters_disabled
from megatron_dmc.ops import DMCConfig
from megatron_dmc.schema.checkpoint import resolve_iteration_dir
from megatron_dmc.schema.llama import LlamaShape
from megatron_dmc.training.config import TrainConfig


class _SilentCollector:
    """Stands in for a DMC model's DecisionCollector while compression is off: no noise
    drawn, no decision recorded, a zero decision sum for the pipeline carry row."""

    length = 0

    def __init__(self, micro_batch_size: int, device: torch.device) -> None:
        self.micro_batch_size = micro_batch_size
        self.device = device

    def begin_forward(self) -> None:
        pass

    def local_sum_B(self) -> torch.Tensor:
        return torch.zeros(self.micro_batch_size, device=self.device)

    def record(self, *args: Any) -> None:
        raise AssertionError("a DMC layer with compression off recorded a decision")

    def record_uncompressed(self, *args: Any) -> None:
        pass

    def generator(self, *args: Any) -> None:
        raise AssertionError("a DMC layer with compression off drew decision noise")


@contextmanager
def compression_off(module: torch.nn.Module, micro_batch_size: int) -> Iterator[None]:
    """Run `module` (a GPT model, unwrapped) as the original model: plain attention in every
    DMC layer, LoRA adapters bypassed, its decision collector untouched."""
    layers = [m for m in module.modules() if isinstance(m, DMCSelfAttention)]
    before = [(layer.collector, getattr(layer, "compression_off", False)) for layer in layers]
    owner = module.collector if isinstance(module, DMCGPTModel) else None
    silent = _SilentCollector(micro_batch_size, next(module.parameters()).device)
    for layer in layers:
        layer.collector, layer.compression_off = silent, True
    if owner is not None:
        module.collector = silent
    try:
        with adapters_disabled(module):
            yield
    finally:
        for layer, (collector, off) in zip(layers, before):
            layer.collector, layer.compression_off = collector, off
        if owner is not None:
            module.collector = owner


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _teacher_forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None)
    return (output[0] if isinstance(output, tuple) else output), None


class Teacher:
    """Logits of the original model; `copy` None: the student with compression off.
    `chunk`: micro-batches per teacher pass (0: the whole step)."""

    def __init__(self, copy: torch.nn.Module | None, seq_length: int, chunk: int = 0) -> None:
        self.copy = copy
        self.seq_length = seq_length
        self.chunk = chunk

    @torch.no_grad()
    def logits(
        self,
        student: torch.nn.Module,
        batches: list[dict[str, torch.Tensor]],
        schedule_seq_length: int,
        micro_batch_size: int,
    ) -> list[torch.Tensor]:
        """[b, s, V] per micro-batch on the last pipeline stage (empty elsewhere).
        Collective over the model-parallel ranks, like a forward-only step."""
        model = self.copy if self.copy is not None else _unwrap(student)
        seq = schedule_seq_length
        if self.copy is not None:
            pp = parallel_state.get_pipeline_model_parallel_world_size()
            seq = pipeline_seq_length(self.seq_length, pp)
        with cpu_device_mode(), compression_off(model, micro_batch_size):
            outputs = get_forward_backward_func()(
                forward_step_func=_teacher_forward_step,
                data_iterator=iter(batches),
                model=[model],
                num_microbatches=len(batches),
                seq_length=seq,
                micro_batch_size=micro_batch_size,
                forward_only=True,
            )
        if not parallel_state.is_pipeline_last_stage():
            return []
        return list(outputs)


def uses_self(cfg: TrainConfig) -> bool:
    """The student with compression off is the original model: a frozen base whose
    attention weights no stage rewrites (the heads decision source)."""
    heads = cfg.dmc.dmc_decision_source == "heads"
    return cfg.retrofit.frozen_base and heads


def teacher_source(cfg: TrainConfig) -> str | None:
    return cfg.retrofit.dmc_teacher_load or cfg.checkpoint.load


def check_teacher_checkpoint(model: torch.nn.Module, source: str) -> Path:
    """The checkpoint's tensors have the teacher model's global shapes, else ValueError."""
    directory = resolve_iteration_dir(source)
    saved = dist_checkpointing.load_tensors_metadata(str(directory))
    for key, want in _global_shapes(model).items():
        if key not in saved:
            raise ValueError(
                f"teacher checkpoint {source} has no tensor {key}: it is not a Llama of "
                "the student's shape; give --dmc-teacher-load with the original weights"
            )
        got = tuple(saved[key].global_shape)
        if got != want:
            raise ValueError(
                f"teacher checkpoint {source}: {key} has shape {got} but the student's "
                f"model implies {want}; the teacher must be the student's model shape"
            )
    return directory


def _global_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    for value in model.sharded_state_dict().values():
        if isinstance(value, ShardedTensor):
            out[value.key] = tuple(value.global_shape)
    return out


def frozen_copy(model_config: LlamaShape, transformer_config) -> torch.nn.Module:
    """A teacher model: DMC layers (channel source: the state-dict keys of a vanilla
    Llama) that always run with compression off, i.e. plain causal attention through SDPA,
    frozen. Load the original weights into it."""
    copy = build_model(model_config, "dmc", DMCConfig(), transformer_config)
    copy.requires_grad_(False)
    return copy.eval()


def build_teacher(
    cfg: TrainConfig, model_config: LlamaShape, student: torch.nn.Module
) -> Teacher | None:
    """The run's teacher (None without distillation). Collective. A frozen copy is loaded
    from --dmc-teacher-load (default --load); a checkpoint of another shape is refused."""
    if not cfg.retrofit.distill:
        return None
    if uses_self(cfg):
        return Teacher(None, cfg.batch.seq_length, cfg.retrofit.dmc_distill_chunk)
    from megatron_dmc.training.model_api import transformer_config

    copy = frozen_copy(model_config, transformer_config(model_config, cfg))
    source = teacher_source(cfg)
    assert source is not None, "config check: a frozen-copy teacher needs --load"
    directory = check_teacher_checkpoint(copy, source)
    state = dist_checkpointing.load({"model": copy.sharded_state_dict()}, str(directory))
    copy.load_state_dict(state["model"], strict=True)
    return Teacher(copy, cfg.batch.seq_length, cfg.retrofit.dmc_distill_chunk)
