"""The retrofit run: set up, resume, then zero_out -> retrofit -> finetune in one launch
(or the plain stage alone)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dmc.distributed import initialize_distributed
from megatron_dmc.model.qkv import decision_row_selectors
from megatron_dmc.ops import training_length_cr
from megatron_dmc.schema.llama import LlamaShape
from megatron_dmc.training import checkpoint as ckpt
from megatron_dmc.training import model_api
from megatron_dmc.training.config import TrainConfig
from megatron_dmc.training.data import build_datasets, micro_batches
from megatron_dmc.training.loss import LossSettings
from megatron_dmc.training.metrics import MetricsWriter
from megatron_dmc.training.optim import build_optimizer, set_decision_lr_mult, stage_lr_scheduler
from megatron_dmc.training.record import LayerWatch, NonFiniteLossError, StepRecorder
from megatron_dmc.training.rng import reseed_for_step
from megatron_dmc.training.stages import Stage, plan, start_position
from megatron_dmc.training.step import run_batches, train_step
from megatron_dmc.training.teacher import Teacher, build_teacher
from megatron_dmc.training.trainable import check_checkpoint
from megatron_dmc.training.validate import validate


@dataclass
class Run:
    """Everything the stage loop touches."""

    cfg: TrainConfig
    model_config: LlamaShape
    model: Any
    optimizer: Any
    progress: ckpt.Progress
    train_data: Any
    valid_data: Any
    writer: MetricsWriter
    recorder: StepRecorder
    saved_at: int = -1
    teacher: Teacher | None = None

    @property
    def num_microbatches(self) -> int:
        dp = parallel_state.get_data_parallel_world_size()
        return self.cfg.global_batch_size // (self.cfg.batch.micro_batch_size * dp)

    def settings(self, stage: Stage, step: int) -> LossSettings:
        count = self.model_config.num_hidden_layers * self.model_config.num_key_value_heads
        return LossSettings(
            self.training_length_target(stage.target_cr(step)),
            count * self.cfg.batch.seq_length,
            self.cfg.dmc.dmc_cr_loss_weight,
            self.cfg.retrofit.dmc_lm_loss_weight,
            self.cfg.retrofit.dmc_distill_weight,
            cr_overshoot=self.cfg.dmc.dmc_cr_overshoot,
        )

    def training_length_target(self, target_cr: float | None) -> float | None:
        """The schedule's CR, asked at --dmc-cr-reference-length, as the CR the training
        sequences must reach (the same where there is no reference length or delay)."""
        dmc = self.cfg.dmc
        if target_cr is None:
            return None
        return training_length_cr(
            target_cr, self.cfg.batch.seq_length, dmc.dmc_merge_delay, dmc.dmc_cr_reference_length
        )

    def batches(self, data, stage: Stage, forward_only: bool):
        cfg = self.cfg
        return run_batches(
            self.model,
            data,
            self.num_microbatches,
            model_api.schedule_seq_length(self.model, cfg),
            cfg.batch.micro_batch_size,
            self.settings(stage, self.progress.stage_step),
            forward_only,
        )


def _one_step(run: Run, stage: Stage, data, watch: LayerWatch) -> dict[str, Any]:
    cfg, progress = run.cfg, run.progress
    reseed_for_step(cfg.batch.seed, progress.iteration)
    model_api.prepare_step(run.model, stage, progress.stage_step, progress.iteration)
    settings = run.settings(stage, progress.stage_step)
    start = time.perf_counter()
    result = train_step(
        run.model,
        run.optimizer,
        data,
        run.num_microbatches,
        model_api.schedule_seq_length(run.model, cfg),
        cfg.batch.micro_batch_size,
        settings,
        run.teacher,
    )
    elapsed = time.perf_counter() - start
    problem = run.recorder.check_finite(result, progress.iteration + 1, stage.name, watch)
    if problem is not None:
        _skip_or_stop(run, problem)
    alpha_LN = model_api.alpha_means(run.model, run.model_config)
    base = {
        "iteration": progress.iteration + 1,
        "stage": stage.name,
        "stage_step": progress.stage_step + 1,
        "lr": run.optimizer.param_groups[0]["lr"],
        "zero_out_scale": stage.zero_out_scale(progress.stage_step),
        "step_ms": elapsed * 1e3,
        "tokens_per_s": cfg.global_batch_size * cfg.batch.seq_length / elapsed,
    }
    record = run.recorder.record(
        base, result, alpha_LN, settings.decisions_per_sequence, settings.target_cr
    )
    reference, asked = cfg.dmc.dmc_cr_reference_length, stage.target_cr(progress.stage_step)
    if reference is not None and asked is not None:
        record["reference_target_cr"], record["cr_reference_length"] = asked, reference
    if problem is not None:
        record["skipped_iterations"] = progress.skipped_iterations
    if run.teacher is not None:
        record["kl_loss"] = result.stats["kl_sum"] / max(result.stats["tokens"], 1.0)
    return record


def _skip_or_stop(run: Run, problem: str) -> None:
    """A step with a non-finite loss or gradient was not applied: skip it while
    --skip-nonfinite-steps allows, else stop (nothing of this step is saved)."""
    allowed, done = run.cfg.optim.skip_nonfinite_steps, run.progress.skipped_iterations
    if done >= allowed:
        hint = (
            f"{done} such steps were skipped already (--skip-nonfinite-steps {allowed})"
            if allowed
            else "to skip such steps instead, add --skip-nonfinite-steps N"
        )
        raise NonFiniteLossError(
            f"{problem}; this update was not applied and nothing was saved, so the last "
            f"checkpoint is the last good one; {hint}"
        )
    run.progress.skipped_iterations += 1
    if model_api.is_logging_rank():
        print(f"skipped: {problem} ({done + 1} of --skip-nonfinite-steps {allowed})", flush=True)


def _run_stage(run: Run, stage: Stage, stop_at: int, warmup_iters: int = 0) -> bool:
    """Train `stage` from run.progress.stage_step; False when --train-iters stopped it."""
    cfg, progress = run.cfg, run.progress
    scheduler = stage_lr_scheduler(
        run.optimizer, stage, cfg.optim, progress.stage_step, warmup_iters
    )
    data = micro_batches(run.train_data, cfg.batch.micro_batch_size, progress.consumed_samples)
    watch = LayerWatch(run.model, run.model_config.num_hidden_layers)
    try:
        while progress.stage_step < stage.iters:
            if progress.iteration >= stop_at:
                return False
            record = _one_step(run, stage, data, watch)
            progress.iteration += 1
            progress.stage_step += 1
            progress.consumed_samples += cfg.global_batch_size
            scheduler.step(1)
            record["valid_lm_loss"] = _eval_loss(run, stage)
            if progress.iteration % cfg.logging.log_interval == 0 or record["valid_lm_loss"]:
                run.writer.write(_loggable(record, cfg.logging.log_per_head_cr))
            interval = cfg.checkpoint.save_interval
            last = progress.stage_step == stage.iters  # saved below, once the stage is done
            if interval and progress.iteration % interval == 0 and not last:
                save(run)
    finally:
        watch.remove()
    return True


def _loggable(record: dict[str, Any], per_head: bool) -> dict[str, Any]:
    if per_head:
        return record
    return {k: v for k, v in record.items() if k != "layer_head_cr"}


def _eval_loss(run: Run, stage: Stage) -> float | None:
    cfg = run.cfg
    interval = cfg.logging.eval_interval
    if not interval or run.valid_data is None or run.progress.iteration % interval:
        return None
    run.model.eval()
    data = micro_batches(run.valid_data, cfg.batch.micro_batch_size, 0)
    lm, tokens = 0.0, 0.0
    with torch.no_grad():
        for _ in range(cfg.logging.eval_iters):
            result = run.batches(data, stage, forward_only=True)
            lm += result.stats["lm_loss_sum"]
            tokens += result.stats["tokens"]
    run.model.train()
    return lm / max(tokens, 1.0)


def save(run: Run) -> None:
    """Checkpoint under --save (no-op without it, or when this iteration is saved already:
    an iteration is saved at most once, so a save never replaces the one the tracker names)."""
    if run.cfg.checkpoint.save is None or run.saved_at == run.progress.iteration:
        return
    ckpt.save_checkpoint(*_save_args(run))
    run.saved_at = run.progress.iteration


def _save_args(run: Run):
    cr = run.recorder.layer_head_cr
    extra = {"args": run.cfg.flat(), **model_api.export_metadata(run.model_config, run.cfg, cr)}
    return run.cfg.checkpoint.save, run.model, run.optimizer, run.progress, extra, cr


def _resume_source(cfg: TrainConfig) -> tuple[str | None, bool]:
    """(checkpoint to start from, whether it is this run's own): --save first (with a
    tracker, or holding the --ckpt-step iteration), then --load."""
    save, step = cfg.checkpoint.save, cfg.checkpoint.ckpt_step
    if ckpt.has_checkpoint(save) or (
        save is not None and step is not None and ckpt.iteration_dir(save, step).is_dir()
    ):
        return save, True
    return cfg.checkpoint.load, False


def _load(run: Run, source: str, own: bool) -> None:
    cfg = run.cfg.checkpoint
    weights_only = cfg.finetune and not own
    progress, _ = ckpt.load_checkpoint(
        source,
        run.model,
        run.optimizer,
        load_optim=not (weights_only or cfg.no_load_optim),
        load_rng=not (weights_only or cfg.no_load_rng),
        step=cfg.ckpt_step,
    )
    run.progress = ckpt.Progress() if weights_only else progress
    if own:
        run.saved_at = progress.iteration


def _setup(cfg: TrainConfig) -> tuple[Run, list[Stage], int]:
    model_config = validate(cfg)
    initialize_distributed(
        cfg.parallel.tensor_model_parallel_size,
        cfg.parallel.pipeline_model_parallel_size,
        cfg.batch.seed,
    )
    stages = plan(cfg.dmc)
    source, own = _resume_source(cfg)
    common = None if source is None else ckpt.read_common(source, cfg.checkpoint.ckpt_step)
    progress = ckpt.Progress()
    if common is not None and not (cfg.checkpoint.finetune and not own):
        progress = ckpt.Progress(**common.get("dmc_progress", {}))
    position = start_position(stages, progress.stage, progress.stage_step, progress.stage_done)
    if common is not None:
        weights_only = cfg.checkpoint.finetune and not own
        load_optim = not (weights_only or cfg.checkpoint.no_load_optim)
        check_checkpoint(cfg.retrofit, common, load_optim)
    first = stages[min(position.stage_index, len(stages) - 1)]
    model = model_api.build(model_config, cfg, first.attention)
    teacher = build_teacher(cfg, model_config, model)
    optimizer = build_optimizer(
        model, cfg.optim, cfg.model.bf16, cfg.parallel.use_distributed_optimizer
    )
    writer = MetricsWriter(
        cfg.checkpoint.save,
        cfg.logging.tensorboard_dir,
        model_api.is_logging_rank(),
        resume_from=progress.iteration,
    )
    run = Run(
        cfg,
        model_config,
        model,
        optimizer,
        progress,
        None,
        None,
        writer,
        StepRecorder(model_config),
        teacher=teacher,
    )
    if source is not None:
        _load(run, source, own)
    run.train_data, run.valid_data = build_datasets(cfg, model_config.vocab_size)
    return run, stages, position.stage_index


def _enter_stage(run: Run, stage: Stage) -> None:
    progress = run.progress
    if progress.stage != stage.name:
        progress.stage, progress.stage_step, progress.stage_done = stage.name, 0, False
    if model_api.attention_of(run.model) != stage.attention:
        run.model, run.optimizer = model_api.rebuild(
            run.model, run.optimizer, run.model_config, run.cfg, stage.attention
        )
    mult = run.cfg.optim.dmc_decision_lr_mult if stage.attention == "dmc" else 1.0
    set_decision_lr_mult(run.optimizer, decision_row_selectors(run.model.module), mult)


def train(cfg: TrainConfig) -> ckpt.Progress:
    """Run this launch's stages from wherever the checkpoint left off; returns the progress."""
    run, stages, first = _setup(cfg)
    stop_at = cfg.batch.train_iters or 2**62
    try:
        for stage in stages[first:]:
            _enter_stage(run, stage)
            warmup = cfg.optim.lr_warmup_iters if stage is stages[0] else 0
            if not _run_stage(run, stage, stop_at, warmup):
                save(run)
                break
            if stage.name == "zero_out":
                model_api.finish_zero_out(run.model, run.optimizer)
            run.progress.stage_done = True
            save(run)
    finally:
        run.writer.close()
    if run.writer.enabled:
        print(run.recorder.summary(), flush=True)
    dist.barrier()
    return run.progress
