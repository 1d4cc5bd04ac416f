"""The trainer's seam to `megatron_dmc.model`: build and wrap per stage, switch stages,
read decisions, zero the decision rows, and the export metadata of a checkpoint.

Legend: b micro-batch size, s sequence length, L layers, N KV heads (whole model).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads

from megatron_dmc.compat import cpu_device_mode
from megatron_dmc.model.builder import build_model
from megatron_dmc.model.config import to_transformer_config
from megatron_dmc.model.decisions import DecisionSums, gather_alpha_means
from megatron_dmc.model.gpt import DMCGPTModel, pipeline_seq_length
from megatron_dmc.model.grad_layout import standard_output_grad
from megatron_dmc.model.lora import LORA_KEY
from megatron_dmc.model.qkv import decision_row_selectors, zero_decision_rows
from megatron_dmc.model.zero_out import ZeroOutSelfAttention, set_zero_out_lambda
from megatron_dmc.ops import DMCConfig, dms_config
from megatron_dmc.schema.checkpoint import METADATA_KEY, checkpoint_metadata
from megatron_dmc.schema.llama import LlamaShape
from megatron_dmc.training.config import PLAIN, TrainConfig
from megatron_dmc.training.stages import Stage
from megatron_dmc.training.trainable import apply_trainable


def transformer_config(model_config: LlamaShape, cfg: TrainConfig):
    recompute: dict[str, Any] = {}
    if cfg.model.recompute_granularity == "selective":
        recompute = {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    elif cfg.model.recompute_granularity == "full":
        recompute = {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    return to_transformer_config(
        model_config,
        cfg.parallel.tensor_model_parallel_size,
        cfg.parallel.pipeline_model_parallel_size,
        params_dtype=torch.bfloat16 if cfg.model.bf16 else torch.float32,
        sequence_parallel=cfg.model.sequence_parallel,
        **recompute,
    )


def dmc_config(cfg: TrainConfig) -> DMCConfig:
    if cfg.dmc.kv_method == "dms":
        return dms_config(
            cfg.dmc.dmc_merge_delay,
            cfg.dmc.dmc_init_val,
            cfg.dmc.dmc_temperature,
            cfg.dmc.dmc_decision_source,
        )
    return DMCConfig(
        window_size=cfg.dmc.dmc_window_size,
        init_val=cfg.dmc.dmc_init_val,
        temperature=cfg.dmc.dmc_temperature,
        decision_source=cfg.dmc.dmc_decision_source,
        merge_delay=cfg.dmc.dmc_merge_delay,
    )


def _wrap(module: torch.nn.Module, cfg: TrainConfig) -> DistributedDataParallel:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    with cpu_device_mode():
        model = DistributedDataParallel(module.config, ddp_config, module)
    model.config.no_sync_func = model.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    return model


def build(model_config: LlamaShape, cfg: TrainConfig, attention: str) -> DistributedDataParallel:
    """This rank's stage of the model for `attention` with the --dmc-trainable set applied
    (adapters added, the rest frozen), wrapped in Megatron's DDP; the output layer's
    gradient goes through `standard_output_grad` (distillation's logits gradient)."""
    module = build_model(
        model_config,
        attention,
        dmc_config(cfg) if attention in ("dmc", "zero_out") else None,
        transformer_config(model_config, cfg),
        noise_seed=cfg.batch.seed,
    )
    apply_trainable(module, cfg.retrofit, cfg.batch.seed)
    standard_output_grad(module)
    return _wrap(module, cfg)


def attention_of(model: DistributedDataParallel) -> str:
    if isinstance(model.module, DMCGPTModel):
        return "dmc"
    zero_out = any(isinstance(m, ZeroOutSelfAttention) for m in model.module.modules())
    return "zero_out" if zero_out else "vanilla"


def rebuild(model, optimizer, model_config: LlamaShape, cfg: TrainConfig, attention: str):
    """(model, optimizer) for another attention mode, same weights and optimizer state."""
    from megatron_dmc.training.optim import build_optimizer

    new_model = build(model_config, cfg, attention)
    new_model.module.load_state_dict(model.module.state_dict(), strict=True)
    new_optimizer = build_optimizer(
        new_model, cfg.optim, cfg.model.bf16, cfg.parallel.use_distributed_optimizer
    )
    new_optimizer.load_state_dict(optimizer.state_dict())
    return new_model, new_optimizer


def prepare_step(
    model: DistributedDataParallel, stage: Stage, stage_step: int, iteration: int
) -> None:
    """Per-step model settings: lambda of zero_out, the noise key and stats of DMC."""
    scale = stage.zero_out_scale(stage_step)
    if scale is not None:
        set_zero_out_lambda(model.module, scale)
    if isinstance(model.module, DMCGPTModel):
        model.module.collector.start_step(iteration)
        model.module.collector.reset_stats()


def schedule_seq_length(model: DistributedDataParallel, cfg: TrainConfig) -> int:
    """Rows sent between pipeline stages: DMC adds one carrying the decision sums."""
    if not isinstance(model.module, DMCGPTModel):
        return cfg.batch.seq_length
    return pipeline_seq_length(cfg.batch.seq_length, cfg.parallel.pipeline_model_parallel_size)


def unpack_output(output: Any) -> tuple[torch.Tensor, DecisionSums | None]:
    """(stage output, decision sums or None for a model without DMC attention)."""
    if isinstance(output, tuple):
        return output[0], output[1]
    return output, None


def alpha_means(model: DistributedDataParallel, model_config: LlamaShape) -> torch.Tensor | None:
    """Mean hard alpha per (layer, KV head) over this step, [L, N], on every rank
    (collective); None for a model without DMC attention."""
    if not isinstance(model.module, DMCGPTModel):
        return None
    return gather_alpha_means(
        model.module, model_config.num_hidden_layers, model_config.num_key_value_heads
    )


def finish_zero_out(model: DistributedDataParallel, optimizer) -> None:
    """Zero the decision rows (their weights and their optimizer moments)."""
    from megatron_dmc.training.optim import restart_decision_moments

    set_zero_out_lambda(model.module, 0.0)
    assert zero_decision_rows(model.module) > 0, "no attention layer found to zero"
    restart_decision_moments(optimizer, decision_row_selectors(model.module))


def is_logging_rank() -> bool:
    return dist.get_rank() == dist.get_world_size() - 1


def export_metadata(
    model_config: LlamaShape, cfg: TrainConfig, layer_head_cr: list[list[float]] | None
) -> dict[str, Any]:
    """common.pt entry that the HF exporter reads (DMC fields once DMC has trained)."""
    dmc = None
    if layer_head_cr is not None:
        dmc = {
            "window_size": dmc_config(cfg).window_size,
            "init_val": cfg.dmc.dmc_init_val,
            "target_cr": cfg.dmc.dmc_target_cr,
            "layer_head_cr": layer_head_cr,
            "decision_source": cfg.dmc.dmc_decision_source,
            "merge_delay": cfg.dmc.dmc_merge_delay,
            "kv_method": cfg.dmc.kv_method,
        }
    heads = cfg.dmc.dmc_decision_source == "heads" and cfg.dmc.dmc_stage != PLAIN
    shape = dataclasses.replace(model_config, dtype="float32", dmc_decision_heads=heads)
    metadata = checkpoint_metadata(shape, dmc=dmc)
    if cfg.retrofit.dmc_trainable == "lora":
        metadata[LORA_KEY] = lora_metadata(cfg.retrofit)
    return {METADATA_KEY: metadata}


def lora_metadata(args) -> dict[str, Any]:
    """What an exporter needs to fold the adapters into the weights (`merged_weight`)."""
    return {
        "rank": args.dmc_lora_rank,
        "alpha": args.dmc_lora_alpha,
        "scale": args.dmc_lora_alpha / args.dmc_lora_rank,
        "mlp": args.dmc_lora_mlp,
    }
