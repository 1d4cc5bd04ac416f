"""The run configuration: one dataclass per flag group, composed into `TrainConfig`.

Every field is a command-line flag (`--` + the name with dashes, Megatron's spelling) and
may also come from `--config run.yaml`. Checks that need only the values themselves sit in
`__post_init__`; checks against the model shape and the world live in `validate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("zero_out", "retrofit", "finetune")
"""The three stages of a retrofit, in order."""

PLAIN = "plain"
"""Continued training with vanilla attention and no DMC state (e.g. GQA uptraining)."""

DMC_ONLY_FIELDS = (
    "dmc_target_cr",
    "dmc_ramp_iters",
    "dmc_retrofit_iters",
    "dmc_zero_out_iters",
    "dmc_zero_out_anneal_iters",
    "dmc_finetune_iters",
    "dmc_window_size",
    "dmc_temperature",
    "dmc_init_val",
    "dmc_decision_source",
    "dmc_merge_delay",
    "kv_method",
    "dmc_cr_overshoot",
    "dmc_cr_reference_length",
)
"""DMCArgs fields that mean nothing to --dmc-stage plain."""

STEPS_PER_CR_UNIT = 6000
"""Release recipe: about 6k steps of CR ramp per +1x of compression (global batch 1024)."""


def _positive(name: str, value: int | float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"--{name.replace('_', '-')} must be > 0; got {value!r}")


@dataclass
class ModelArgs:
    model: str = ""
    """Model shape: a name from configs/ (e.g. llama2_7b, tiny) or the path of a model YAML."""

    recompute_granularity: str | None = field(
        default=None, metadata={"choices": ("full", "selective")}
    )
    """Activation recompute: "full" (whole layers) or "selective" (core attention); off if unset."""

    bf16: bool = False
    """bf16 weights and activations with fp32 master weights and optimizer (GPU only)."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism over the TP group (GPU only: needs a TE or apex norm)."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required: a name from configs/ or a model YAML path")


@dataclass
class ParallelArgs:
    tensor_model_parallel_size: int = 1
    """Tensor-parallel size: attention heads and MLP columns are split over this many ranks."""

    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size: the layers are split into this many consecutive stages."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer; GPU)."""

    def __post_init__(self) -> None:
        _positive("tensor_model_parallel_size", self.tensor_model_parallel_size)
        _positive("pipeline_model_parallel_size", self.pipeline_model_parallel_size)


@dataclass
class BatchArgs:
    micro_batch_size: int = 1
    """Sequences per micro-batch on one data-parallel rank."""

    global_batch_size: int | None = None
    """Sequences per optimizer step over all ranks; default micro-batch size x data-parallel size."""

    seq_length: int = 4096
    """Tokens per training sequence."""

    train_iters: int | None = None
    """Stop when the iteration count (it runs on across stages and resumes) reaches this;
    default: the end of the last stage of --dmc-stage."""

    seed: int = 1234
    """Seed of weights, data order and the Gumbel noise."""

    def __post_init__(self) -> None:
        _positive("micro_batch_size", self.micro_batch_size)
        _positive("global_batch_size", self.global_batch_size, allow_none=True)
        _positive("seq_length", self.seq_length)
        _positive("train_iters", self.train_iters, allow_none=True)


@dataclass
class OptimizerArgs:
    lr: float = 3e-5
    """Peak learning rate (constant through zero_out and retrofit; the paper's 3e-5 for 7B/13B)."""

    min_lr: float = 3e-6
    """Learning rate at the end of finetune (it decays from --lr over that stage)."""

    lr_decay_style: str = field(
        default="linear", metadata={"choices": ("linear", "cosine", "constant")}
    )
    """Shape of the finetune decay from --lr to --min-lr."""

    lr_warmup_iters: int = 0
    """Linear warm-up from 0 to --lr over the first N steps of the stage this launch's plan
    opens with (zero_out for --dmc-stage all, plain, or the one stage named); a resumed
    launch already past them does not warm up again. 0 is the release."""

    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to biases and norm weights)."""

    adam_beta1: float = 0.9
    """AdamW beta1."""

    adam_beta2: float = 0.95
    """AdamW beta2."""

    adam_eps: float = 1e-5
    """AdamW epsilon."""

    clip_grad: float = 1.0
    """Clip the global gradient norm (over all TP and PP ranks) to this; 0 turns clipping off."""

    dmc_decision_lr_mult: float = 1.0
    """In the DMC stages, scale the AdamW update of the weight rows that produce channel D-1
    (decision and importance logits) by this. 1 is the release; short CPU retrofits need
    more (the rows start at zero and must move the logits by c within tens of steps).
    CPU optimizer only."""

    skip_nonfinite_steps: int = 0
    """Skip (not apply, but count and log) up to this many steps over the run whose loss or
    gradient is NaN/inf, then stop at the next one; 0 stops at the first."""

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr must be in [0, --lr={self.lr}]; got {self.min_lr}")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError("--weight-decay and --clip-grad must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1)")
        _positive("adam_eps", self.adam_eps)
        _positive("dmc_decision_lr_mult", self.dmc_decision_lr_mult)
        if self.lr_warmup_iters < 0:
            raise ValueError(f"--lr-warmup-iters must be >= 0; got {self.lr_warmup_iters}")
        if self.skip_nonfinite_steps < 0:
            raise ValueError(
                f"--skip-nonfinite-steps must be >= 0; got {self.skip_nonfinite_steps}"
            )


@dataclass
class DataArgs:
    data_path: str | None = None
    """Prefix of a Megatron indexed dataset (PREFIX.bin + PREFIX.idx from tools/preprocess_data.py)."""

    valid_data_path: str | None = None
    """Prefix of a separate validation dataset; without it --split divides --data-path."""

    split: str = "99,1,0"
    """Train/valid/test document weights when no --valid-data-path is given."""

    tokenizer_model: str | None = None
    """sentencepiece .model file (Llama 2) that made the dataset."""

    tokenizer_dir: str | None = None
    """Hugging Face tokenizer directory or tokenizer.json that made the dataset."""

    mock_data: bool = False
    """Random tokens instead of a dataset (Megatron's MockGPTDataset): smoke tests and benchmarks."""

    data_cache_path: str | None = None
    """Where GPTDataset writes its index cache (shared by all ranks); default beside the data."""


@dataclass
class CheckpointArgs:
    save: str | None = None
    """Run directory: checkpoints (iter_XXXXXXX), metrics.jsonl and the run arguments."""

    load: str | None = None
    """Checkpoint directory to start from: a run of this trainer, or a converted vanilla model."""

    save_interval: int | None = None
    """Save every this many iterations (and always at the end of each stage and of the run)."""

    finetune: bool = False
    """Load only the weights of --load (iteration, optimizer and RNG start afresh)."""

    no_load_optim: bool = False
    """Do not load the optimizer state of --load."""

    no_load_rng: bool = False
    """Do not load the RNG state of --load."""

    ckpt_step: int | None = None
    """Start from this saved iteration instead of the newest (e.g. the last good one before a
    damaged save); with --load of a vanilla checkpoint it has no effect."""

    def __post_init__(self) -> None:
        _positive("save_interval", self.save_interval, allow_none=True)
        if self.ckpt_step is not None and self.ckpt_step < 0:
            raise ValueError(f"--ckpt-step must be >= 0; got {self.ckpt_step}")


@dataclass
class LoggingArgs:
    log_interval: int = 1
    """Print and record metrics every this many iterations."""

    eval_interval: int | None = None
    """Evaluate validation loss every this many iterations (off when unset)."""

    eval_iters: int = 10
    """Global batches per evaluation."""

    tensorboard_dir: str | None = None
    """Write tensorboard scalars here (LM/CR loss, target vs achieved CR per layer and head)."""

    log_per_head_cr: bool = False
    """Also log the achieved CR of every (layer, KV head) to tensorboard and metrics.jsonl."""

    def __post_init__(self) -> None:
        _positive("log_interval", self.log_interval)
        _positive("eval_interval", self.eval_interval, allow_none=True)
        _positive("eval_iters", self.eval_iters)


@dataclass
class DMCArgs:
    dmc_stage: str = field(default="all", metadata={"choices": (*STAGES, "all", PLAIN)})
    """Stage(s) this launch runs: one of zero_out, retrofit, finetune, or all three in order;
    or plain: continued training with vanilla attention (no DMC), see --plain-iters."""

    dmc_target_cr: float = 4.0
    """Target compression ratio CR* (> 1): reached at the end of the ramp, held in finetune."""

    dmc_ramp_iters: int | None = None
    """Iterations of the linear CR ramp 1 -> CR*; default 6000 per +1x (the release's pace)."""

    dmc_retrofit_iters: int | None = None
    """Length of the retrofit stage; default: the ramp length."""

    dmc_zero_out_iters: int = 250
    """Length of the zero_out stage."""

    dmc_zero_out_anneal_iters: int = 200
    """Iterations over which channel D-1 of q/k is scaled from 1 down to 0 in zero_out."""

    dmc_finetune_iters: int = 2000
    """Length of the finetune stage (fixed CR*, learning rate decays to --min-lr)."""

    dmc_window_size: int = 12
    """Tokens one merged slot averages at most (training matches inference)."""

    dmc_temperature: float = 0.1
    """Gumbel-sigmoid temperature."""

    dmc_init_val: float = 5.0
    """c: decision logit k[D-1] - c, importance sigmoid(q[D-1] + c)."""

    dmc_decision_source: str = field(
        default="channel", metadata={"choices": ("channel", "heads", "query")}
    )
    """Where decisions come from: "channel" (the paper: channel D-1 of q/k, repurposed after
    the zero_out stage), "heads" (a zero-initialised projection of the attention input;
    the model starts exactly as the original, no channel is zeroed, so there is no zero_out
    stage: --dmc-stage all runs retrofit then finetune, --dmc-stage zero_out is refused) or
    "query" (--kv-method dms only: the DMS reference's repurposed query neuron, channel D-1
    of each KV group's first query head, logit 100 * q - c; zero_out anneals that channel
    alone, so the first DMS step evicts nothing)."""

    dmc_merge_delay: int = 0
    """W: the most recent W tokens of every head stay exact; a token's merge decision takes
    effect when it leaves that window (0 = the paper). The window counts as kept slots, so
    the CR reachable at --seq-length S is at most S / (W + 1)."""

    kv_method: str = field(default="dmc", metadata={"choices": ("dmc", "dms")})
    """KV compression method: "dmc" (merging, the paper) or "dms" (learned delayed
    eviction: one token per slot, a token more than --dmc-merge-delay positions behind the
    query is dropped if its decision says so; needs --dmc-decision-source heads or query,
    ignores --dmc-window-size). The stages, schedule, CR loss and distillation are shared."""

    dmc_cr_loss_weight: float = 1.0
    """Weight of the CR loss against the LM loss (1 in the release). The metrics log the
    unweighted CR loss."""

    dmc_cr_overshoot: float | None = None
    """Make the CR loss two-sided: a sequence compressing more than the target x (1 + this)
    pays too (e.g. 0.05: free between 2x and 2.1x). Unset: one-sided, the paper (a run may
    compress more than asked, for free)."""

    dmc_cr_reference_length: int | None = None
    """With --dmc-merge-delay W: the length at which the target CR is asked for (e.g. the
    context + continuation an evaluation or a deployment uses). The W exact tokens weigh
    less in longer sequences, so at the training length the CR loss asks for the CR that
    the same merge rate gives at this length (ops.training_length_cr). Default: the
    --seq-length (the paper's accounting); no effect without a delay."""

    plain_iters: int | None = None
    """Length of --dmc-stage plain (required there, refused elsewhere)."""

    plain_decay_iters: int = 0
    """--dmc-stage plain: the learning rate is --lr, then decays to --min-lr over this many
    last steps (--lr-decay-style); e.g. the finetune length of the DMC run it mirrors."""

    def __post_init__(self) -> None:
        if self.dmc_stage == PLAIN:
            self._check_plain()
        elif self.plain_iters is not None or self.plain_decay_iters:
            raise ValueError(
                "--plain-iters and --plain-decay-iters apply to --dmc-stage plain only"
            )
        if not self.dmc_target_cr > 1.0:
            raise ValueError(
                f"--dmc-target-cr must be > 1 (a compression ratio, e.g. 4 for 4x); "
                f"got {self.dmc_target_cr}"
            )
        if self.dmc_ramp_iters is None:
            self.dmc_ramp_iters = round(STEPS_PER_CR_UNIT * (self.dmc_target_cr - 1.0))
        if self.dmc_retrofit_iters is None:
            self.dmc_retrofit_iters = self.dmc_ramp_iters
        _positive("dmc_ramp_iters", self.dmc_ramp_iters)
        self._check_zero_out_iters()
        _positive("dmc_retrofit_iters", self.dmc_retrofit_iters)
        _positive("dmc_finetune_iters", self.dmc_finetune_iters)
        _positive("dmc_window_size", self.dmc_window_size)
        _positive("dmc_temperature", self.dmc_temperature)
        _positive("dmc_cr_loss_weight", self.dmc_cr_loss_weight)
        _positive("dmc_cr_reference_length", self.dmc_cr_reference_length, allow_none=True)
        if self.dmc_cr_overshoot is not None and self.dmc_cr_overshoot < 0:
            raise ValueError(
                f"--dmc-cr-overshoot must be >= 0 (e.g. 0.05 lets the CR run 5% over the "
                f"target for free); got {self.dmc_cr_overshoot}"
            )
        self._check_decision_source()
        if self.dmc_zero_out_anneal_iters > self.dmc_zero_out_iters:
            raise ValueError(
                "--dmc-zero-out-anneal-iters must be <= --dmc-zero-out-iters (the channel must "
                "reach zero before its weight rows are zeroed)"
            )

    def _check_zero_out_iters(self) -> None:
        """zero_out's lengths must be > 0 where zero_out is in the schedule; without it (heads
        mode) 0 is allowed and they are not used."""
        without = self.dmc_decision_source == "heads"
        for name in ("dmc_zero_out_iters", "dmc_zero_out_anneal_iters"):
            value = getattr(self, name)
            if without and value == 0:
                continue
            _positive(name, value)

    def _check_decision_source(self) -> None:
        if self.dmc_merge_delay < 0:
            raise ValueError(
                f"--dmc-merge-delay must be >= 0 (0 = the paper); got {self.dmc_merge_delay}"
            )
        if self.kv_method == "dms" and self.dmc_decision_source == "channel":
            raise ValueError(
                "--kv-method dms reads its eviction decisions from the decision heads or from "
                "the repurposed query neuron: add --dmc-decision-source heads (or query)"
            )
        if self.kv_method == "dmc" and self.dmc_decision_source == "query":
            raise ValueError(
                "--dmc-decision-source query (one query neuron, an eviction decision, no "
                "importance) is DMS's: add --kv-method dms, or use --dmc-decision-source "
                "channel for DMC's repurposed channel"
            )
        if self.dmc_decision_source == "heads" and self.dmc_stage == "zero_out":
            raise ValueError(
                "--dmc-stage zero_out does not apply to --dmc-decision-source heads: no channel "
                "is repurposed, so there is nothing to zero; run --dmc-stage retrofit (or all)"
            )

    def _check_plain(self) -> None:
        defaults = DMCArgs.__dataclass_fields__
        given = [f for f in DMC_ONLY_FIELDS if getattr(self, f) != defaults[f].default]
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise ValueError(
                f"{flags} do(es) not apply to --dmc-stage plain (vanilla attention, no DMC); "
                "drop them"
            )
        if self.plain_iters is None:
            raise ValueError("--dmc-stage plain needs --plain-iters (its number of steps)")
        _positive("plain_iters", self.plain_iters)
        if not 0 <= self.plain_decay_iters <= self.plain_iters:
            raise ValueError(
                f"--plain-decay-iters must be in [0, --plain-iters={self.plain_iters}]; "
                f"got {self.plain_decay_iters}"
            )

    @property
    def stages(self) -> tuple[str, ...]:
        return self.schedule_stages if self.dmc_stage == "all" else (self.dmc_stage,)

    @property
    def schedule_stages(self) -> tuple[str, ...]:
        """The stages of the whole schedule: the three DMC stages (without zero_out when the
        decisions come from heads), or plain."""
        if self.dmc_stage == PLAIN:
            return (PLAIN,)
        return STAGES[1:] if self.dmc_decision_source == "heads" else STAGES

    @property
    def schedule_iters(self) -> int:
        """Steps of the whole schedule this launch belongs to (whichever of its stages it
        runs)."""
        return sum(self.stage_iters(s) for s in self.schedule_stages)

    def stage_iters(self, stage: str) -> int:
        lengths = {
            "zero_out": self.dmc_zero_out_iters,
            "retrofit": self.dmc_retrofit_iters,
            "finetune": self.dmc_finetune_iters,
            PLAIN: self.plain_iters,
        }
        return int(lengths[stage])


TRAINABLE_SETS = ("all", "attention", "dmc-heads", "lora")
"""What --dmc-trainable may name (see RetrofitArgs.dmc_trainable)."""


@dataclass
class RetrofitArgs:
    dmc_distill_weight: float = 0.0
    """Weight of the per-token KL(student || teacher) against the original model (the same
    weights with compression off when the base is frozen, else a frozen copy of the starting
    weights) in the loss of every DMC stage and zero_out. 0 (the release): no teacher."""

    dmc_lm_loss_weight: float = 1.0
    """Weight of the LM cross-entropy in the loss (1 in the release; 0 with distillation makes
    the KL the only task loss). The metrics log the unweighted LM loss either way."""

    dmc_distill_chunk: int = 0
    """Micro-batches per teacher pass: the teacher's logits of that many micro-batches wait on
    the last pipeline stage for the student's loss (b x s x V/TP each). 0: the whole step in
    one pass; set it when a step has many micro-batches (the result is the same step)."""

    dmc_teacher_load: str | None = None
    """Checkpoint of the teacher's weights when it is a frozen copy; default --load (the
    weights the run started from)."""

    dmc_trainable: str = field(default="all", metadata={"choices": TRAINABLE_SETS})
    """What trains: all (the release), attention (q/k/v/o and the decision heads), dmc-heads
    (the decision heads only; needs --dmc-decision-source heads) or lora (adapters on q/k/v/o,
    plus the decision heads; merged into the weights at export). The rest is frozen and has
    no optimizer state."""

    dmc_lora_rank: int = 8
    """Rank of the LoRA adapters (--dmc-trainable lora)."""

    dmc_lora_alpha: float = 16.0
    """LoRA scale numerator: the adapter adds (alpha / rank) * B A x."""

    dmc_lora_mlp: bool = False
    """Also put LoRA adapters on the MLP's fc1 and fc2 (--dmc-trainable lora)."""

    def __post_init__(self) -> None:
        if self.dmc_distill_weight < 0 or self.dmc_lm_loss_weight < 0:
            raise ValueError("--dmc-distill-weight and --dmc-lm-loss-weight must be >= 0")
        if self.dmc_distill_weight == 0 and self.dmc_lm_loss_weight == 0:
            raise ValueError(
                "--dmc-lm-loss-weight 0 leaves no task loss without distillation; give "
                "--dmc-distill-weight > 0 or keep the LM loss"
            )
        if self.dmc_distill_chunk < 0:
            raise ValueError(f"--dmc-distill-chunk must be >= 0; got {self.dmc_distill_chunk}")
        if self.dmc_lora_rank <= 0:
            raise ValueError(f"--dmc-lora-rank must be > 0; got {self.dmc_lora_rank}")
        _positive("dmc_lora_alpha", self.dmc_lora_alpha)
        if self.dmc_trainable != "lora" and self.dmc_lora_mlp:
            raise ValueError("--dmc-lora-mlp needs --dmc-trainable lora")
        if self.dmc_teacher_load is not None and not self.distill:
            raise ValueError("--dmc-teacher-load needs --dmc-distill-weight > 0")

    @property
    def distill(self) -> bool:
        return self.dmc_distill_weight > 0

    @property
    def frozen_base(self) -> bool:
        """Only decision heads and adapters train: the base weights stay the original's."""
        return self.dmc_trainable in ("dmc-heads", "lora")


GROUPS: dict[str, type] = {
    "model": ModelArgs,
    "parallel": ParallelArgs,
    "batch": BatchArgs,
    "optim": OptimizerArgs,
    "data": DataArgs,
    "checkpoint": CheckpointArgs,
    "logging": LoggingArgs,
    "dmc": DMCArgs,
    "retrofit": RetrofitArgs,
}
"""Flag groups in the order --help shows them; the keys are TrainConfig attributes."""


@dataclass
class TrainConfig:
    model: ModelArgs
    """What to train."""

    parallel: ParallelArgs
    """How to split it over ranks."""

    batch: BatchArgs
    """Batch shape, run length and seed."""

    optim: OptimizerArgs
    """AdamW and its learning-rate schedule."""

    data: DataArgs
    """Where the tokens come from."""

    checkpoint: CheckpointArgs
    """Saving and loading."""

    logging: LoggingArgs
    """Console, tensorboard and metrics.jsonl."""

    dmc: DMCArgs
    """The DMC stages and hyperparameters."""

    retrofit: RetrofitArgs = field(default_factory=RetrofitArgs)
    """Distillation from the original model and what trains."""

    def __post_init__(self) -> None:
        if not self.data.mock_data and self.data.data_path is None:
            raise ValueError(
                "--data-path is required (a dataset prefix made by tools/preprocess_data.py); "
                "use --mock-data for random tokens"
            )
        if self.data.data_path and self.data.mock_data:
            raise ValueError("give either --data-path or --mock-data, not both")
        sizes = (
            self.parallel.tensor_model_parallel_size,
            self.parallel.pipeline_model_parallel_size,
        )
        if self.model.sequence_parallel and sizes[0] == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.checkpoint.finetune and not self.checkpoint.load:
            raise ValueError("--finetune needs --load (the checkpoint to take the weights from)")
        if self.dmc.dmc_stage == PLAIN and self.optim.dmc_decision_lr_mult != 1.0:
            raise ValueError(
                "--dmc-decision-lr-mult does not apply to --dmc-stage plain (no decision rows)"
            )
        self._check_retrofit()

    def _check_retrofit(self) -> None:
        r = self.retrofit
        if self.dmc.dmc_stage == PLAIN and (r.distill or r.dmc_trainable != "all"):
            raise ValueError(
                "--dmc-distill-weight and --dmc-trainable apply to the DMC stages, not to "
                "--dmc-stage plain; drop them"
            )
        heads = self.dmc.dmc_decision_source == "heads"
        if r.dmc_trainable == "dmc-heads" and not heads:
            raise ValueError(
                "--dmc-trainable dmc-heads trains only the decision heads, which exist with "
                "--dmc-decision-source heads only; add it, or use attention / lora / all"
            )
        if r.dmc_trainable == "lora" and self.model.sequence_parallel:
            raise ValueError("--dmc-trainable lora does not support --sequence-parallel yet")
        teacher_copy = r.distill and not (r.frozen_base and heads)
        if teacher_copy and r.dmc_teacher_load is None and self.checkpoint.load is None:
            raise ValueError(
                "distillation with a trainable base (or a channel or query decision source, "
                "whose zero_out changes the base) needs the original weights as a frozen teacher: "
                "give --load or --dmc-teacher-load"
            )

    @property
    def train_samples(self) -> int:
        """Samples the training dataset must hold: every stage of the schedule once (independent
        of where a launch starts, so that a resumed run sees the same data order; a plain run
        as long as a DMC schedule sees the same data as it)."""
        iters = self.dmc.schedule_iters
        return self.global_batch_size * max(iters, self.batch.train_iters or 0)

    @property
    def global_batch_size(self) -> int:
        assert self.batch.global_batch_size is not None, "resolved by validate_world"
        return self.batch.global_batch_size

    def flat(self) -> dict[str, object]:
        """All fields by flag name (underscored): what --config YAML and run_args.json hold."""
        out: dict[str, object] = {}
        for group in GROUPS:
            out.update(vars(getattr(self, group)))
        return out
