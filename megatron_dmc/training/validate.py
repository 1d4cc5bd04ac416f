"""Checks of a run against the model shape, the world and the files, before any work.

Each failure is a ValueError that says what to change.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_dmc.compat import cuda_available
from megatron_dmc.data.gpt_dataset import check_data_prefix
from megatron_dmc.model.config import check_layout
from megatron_dmc.schema.checkpoint import read_metadata
from megatron_dmc.schema.llama import LlamaShape
from megatron_dmc.training.checkpoint import has_checkpoint
from megatron_dmc.training.config import PLAIN, TrainConfig
from megatron_dmc.training.stages import plan


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_batch(cfg: TrainConfig, world_size: int) -> None:
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ValueError(
            f"{world_size} processes cannot be split into tensor x pipeline = {tp} x {pp} "
            f"groups; launch a multiple of {tp * pp} processes (torchrun --nproc-per-node)"
        )
    dp = world_size // (tp * pp)
    per_step = cfg.batch.micro_batch_size * dp
    if cfg.batch.global_batch_size is None:
        cfg.batch.global_batch_size = per_step
    if cfg.batch.global_batch_size % per_step:
        raise ValueError(
            f"--global-batch-size {cfg.batch.global_batch_size} is not a multiple of "
            f"--micro-batch-size x data-parallel size = {cfg.batch.micro_batch_size} x {dp}"
        )


def _check_device(cfg: TrainConfig) -> None:
    if cuda_available():
        if cfg.optim.dmc_decision_lr_mult != 1.0:
            raise ValueError(
                "--dmc-decision-lr-mult is implemented by the CPU optimizer only; on GPU "
                "leave it at 1 (the release recipe) and train longer"
            )
        return
    for flag, on in (
        ("--bf16", cfg.model.bf16),
        ("--sequence-parallel", cfg.model.sequence_parallel),
        ("--use-distributed-optimizer", cfg.parallel.use_distributed_optimizer),
    ):
        if on:
            raise ValueError(f"{flag} needs a GPU; on CPU train in fp32 without it")


def _check_recompute(cfg: TrainConfig) -> None:
    dmc_stages = [s for s in cfg.dmc.stages if s in ("retrofit", "finetune")]
    if cfg.model.recompute_granularity == "full" and dmc_stages:
        raise ValueError(
            f"--recompute-granularity full is not supported in the DMC stage(s) "
            f"{', '.join(dmc_stages)}; use --recompute-granularity selective (it recomputes "
            "the core attention, where DMC's activations are)"
        )


def _check_files(cfg: TrainConfig) -> None:
    if cfg.data.data_path is not None:
        check_data_prefix(cfg.data.data_path)
        if (cfg.data.tokenizer_model is None) == (cfg.data.tokenizer_dir is None):
            raise ValueError(
                "give exactly one of --tokenizer-model / --tokenizer-dir: the tokenizer that "
                "made --data-path"
            )
    if cfg.data.valid_data_path is not None:
        check_data_prefix(cfg.data.valid_data_path, "--valid-data-path")
    load = cfg.checkpoint.load
    if load is not None and not (has_checkpoint(load) or Path(load).is_dir()):
        raise ValueError(
            f"--load {load}: no checkpoint there (expected latest_checkpointed_iteration.txt)"
        )


def _check_warmup(cfg: TrainConfig) -> None:
    """The warm-up fits in the opening stage: shorter than it, and over before a decay that
    starts late (plain's --plain-decay-iters); a whole-stage decay starts after it."""
    warmup, first = cfg.optim.lr_warmup_iters, plan(cfg.dmc)[0]
    whole_stage = first.decay_iters in (0, first.iters)
    bound = first.iters if whole_stage else first.iters - first.decay_iters
    if warmup and warmup >= bound:
        raise ValueError(
            f"--lr-warmup-iters {warmup} must be below {bound}: the {first.name} stage has "
            f"{first.iters} steps, the last {first.decay_iters} of them decaying the LR"
        )


def _check_merge_delay(cfg: TrainConfig) -> None:
    """With W tokens always exact, a sequence of S tokens keeps at least W + 1 slots."""
    delay, length, target = cfg.dmc.dmc_merge_delay, cfg.batch.seq_length, cfg.dmc.dmc_target_cr
    if cfg.dmc.dmc_stage != PLAIN and (delay + 1) * target > length:
        raise ValueError(
            f"--dmc-merge-delay {delay} keeps {delay} of the --seq-length {length} tokens "
            f"exact, so no sequence can reach --dmc-target-cr {target:g} (at most "
            f"{length / (delay + 1):.3g}x); use a delay below {length / target - 1:.0f} or "
            "longer sequences"
        )
    reference = cfg.dmc.dmc_cr_reference_length
    if cfg.dmc.dmc_stage != PLAIN and reference is not None and (delay + 1) * target > reference:
        raise ValueError(
            f"--dmc-merge-delay {delay} keeps {delay} of the --dmc-cr-reference-length "
            f"{reference} tokens exact, so they cannot reach --dmc-target-cr {target:g} (at "
            f"most {reference / (delay + 1):.3g}x); use a longer reference length or a "
            "shorter delay"
        )


def _check_decision_source(cfg: TrainConfig) -> None:
    """The checkpoint at --load must carry decisions where this run looks for them."""
    if cfg.checkpoint.load is None or cfg.dmc.dmc_stage == PLAIN:
        return
    try:
        metadata = read_metadata(cfg.checkpoint.load)
    except ValueError:
        return  # no megatron_dmc metadata: a vanilla Megatron checkpoint
    has_heads = bool(metadata["llama"].get("dmc_decision_heads", False))
    heads = cfg.dmc.dmc_decision_source == "heads"
    trained_source = (metadata.get("dmc") or {}).get("decision_source")
    source = cfg.dmc.dmc_decision_source
    if "query" in (trained_source, source) and trained_source not in (None, source):
        raise ValueError(
            f"--load {cfg.checkpoint.load} was trained with --dmc-decision-source "
            f"{trained_source}; continue it with --dmc-decision-source {trained_source}, or "
            "start from the original model"
        )
    trained_channel = metadata.get("dmc") is not None and not has_heads
    if heads and trained_channel:
        raise ValueError(
            f"--load {cfg.checkpoint.load} is a channel-mode DMC model (e.g. an imported "
            "release): its decisions live in channel D-1 of q and k, which it no longer uses "
            "for attention; --dmc-decision-source heads starts from the original model "
            "instead, or continue this one with --dmc-decision-source channel"
        )
    if has_heads and not heads:
        raise ValueError(
            f"--load {cfg.checkpoint.load} has DMC decision heads; continue it with "
            "--dmc-decision-source heads"
        )
    trained = (metadata.get("dmc") or {}).get("kv_method")
    if trained is not None and trained != cfg.dmc.kv_method:
        raise ValueError(
            f"--load {cfg.checkpoint.load} was trained with --kv-method {trained}: its "
            f"decision heads mean something else under --kv-method {cfg.dmc.kv_method}; "
            f"continue it with --kv-method {trained}, or start from the original model"
        )


def validate(cfg: TrainConfig, world_size: int | None = None) -> LlamaShape:
    """All checks; fills in the default global batch size. Returns the model shape."""
    world_size = world_size_from_env() if world_size is None else world_size
    model = LlamaShape.from_yaml(cfg.model.model)
    check_layout(
        model,
        cfg.parallel.tensor_model_parallel_size,
        cfg.parallel.pipeline_model_parallel_size,
        cfg.model.sequence_parallel,
    )
    if cfg.batch.seq_length > model.max_position_embeddings:
        raise ValueError(
            f"--seq-length {cfg.batch.seq_length} exceeds the model's "
            f"max_position_embeddings {model.max_position_embeddings}"
        )
    if cfg.dmc.dmc_stage != PLAIN and model.head_dim < 4:
        raise ValueError("DMC needs a head dim of at least 4 (one channel carries the decision)")
    _check_batch(cfg, world_size)
    _check_device(cfg)
    _check_recompute(cfg)
    _check_warmup(cfg)
    _check_merge_delay(cfg)
    _check_files(cfg)
    _check_decision_source(cfg)
    return model
