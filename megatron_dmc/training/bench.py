"""Training step time of DMC against vanilla attention: same model, weights and batch,
measured side by side in one process.

    python -m megatron_dmc.training.bench                     # seq 1024, small model
    python -m megatron_dmc.training.bench --model llama2_7b --num-layers 2 --bf16   # GPU

A step is the trainer's own `train_step`: forward and backward through Megatron-Core's
schedule (DMC: Gumbel-sigmoid decisions, windowed accumulation, biased attention and the
CR loss of the retrofit stage), then the clipped AdamW update. Beside them, a plain
transformers `LlamaForCausalLM` of the same shape takes a forward+backward+AdamW step on
the same batch (training/bench_hf.py; --no-transformers skips it), and the CPU seconds per
token of each are printed. Steps alternate between the models after warm-up, so all
see the same machine load; the medians and their ratios
are printed (goal: DMC <= 1.15x vanilla). On a CPU with one torch thread the clock is the
process CPU time (the machine may be shared), elsewhere wall time after synchronising.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
from collections.abc import Sequence

import torch

from megatron_dmc.bench.timing import clock_name, timed
from megatron_dmc.schema.llama import LlamaShape

GOAL = 1.15
"""DMC step time / vanilla step time the implementation aims to stay under."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_dmc.training.bench")
    parser.add_argument("--model", default="smollm2_135m", help="configs/ name or model YAML")
    parser.add_argument("--num-layers", type=int, default=4, help="override the layer count")
    parser.add_argument(
        "--vocab-size", type=int, default=8192, help="override the vocabulary (0: keep)"
    )
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--num-microbatches", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per model")
    parser.add_argument("--target-cr", type=float, default=4.0, help="CR the DMC loss asks for")
    parser.add_argument("--recompute", choices=("selective",), default=None)
    parser.add_argument("--bf16", action="store_true", help="bf16 (GPU)")
    parser.add_argument(
        "--distill",
        action="store_true",
        help="also time DMC with distillation from a frozen copy (dmc_distill), LoRA adapters "
        "with the same teacher (dmc_lora_distill), and heads-mode DMC with LoRA distilled from "
        "itself with compression off (dmc_heads_lora_self)",
    )
    parser.add_argument(
        "--efficient", action="store_true",
        help="also time the efficient recipe's retrofit step (dmc_efficient: decision heads, "
        "merge delay 64, distillation from itself with compression off, only the heads train)",
    )  # fmt: skip
    parser.add_argument(
        "--no-transformers", action="store_true",
        help="skip the plain transformers LlamaForCausalLM fwd+bwd+AdamW baseline",
    )  # fmt: skip
    parser.add_argument(
        "--overheads", action="store_true",
        help="also time a trainer launch and a checkpoint save/load (training/overheads.py)",
    )  # fmt: skip
    return parser


def _check(args: argparse.Namespace) -> None:
    for name in ("num_layers", "seq_length", "micro_batch_size", "num_microbatches", "reps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.vocab_size < 0 or args.target_cr <= 1:
        raise ValueError("--warmup and --vocab-size must be >= 0 and --target-cr > 1")


def model_shape(args: argparse.Namespace) -> LlamaShape:
    base = LlamaShape.from_yaml(args.model)
    return dataclasses.replace(
        base,
        num_hidden_layers=args.num_layers,
        vocab_size=args.vocab_size or base.vocab_size,
        max_position_embeddings=max(base.max_position_embeddings, args.seq_length),
    )


def _train_config(args: argparse.Namespace):
    from megatron_dmc.training.arguments import parse_args

    argv = ["--model", args.model, "--mock-data", "--seq-length", str(args.seq_length)]
    argv += ["--micro-batch-size", str(args.micro_batch_size), "--lr", "1e-5"]
    argv += ["--dmc-target-cr", str(args.target_cr), "--dmc-ramp-iters", "1"]
    argv += ["--bf16"] * args.bf16
    argv += ["--recompute-granularity", args.recompute] if args.recompute else []
    return parse_args(argv)


def _batch(args: argparse.Namespace, vocab_size: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (args.micro_batch_size, args.seq_length + 1)
    tokens = torch.randint(0, vocab_size, shape, generator=generator).to(device)
    positions = torch.arange(args.seq_length, device=device).expand(shape[0], -1)
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(shape[0], args.seq_length, device=device),
        "position_ids": positions,
    }


class SDPACoreAttention(torch.nn.Module):
    """Plain causal attention through torch's SDPA (the kernel DMC's attention calls), in
    place of Megatron's local `DotProductAttention`, which materialises the scores: the
    vanilla baseline with the same attention kernel as DMC. No parameters."""

    def __init__(self, softmax_scale: float | None) -> None:
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, **_) -> torch.Tensor:
        q_BHTD, k_BGTD, v_BGTD = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        groups = q_BHTD.shape[1] // k_BGTD.shape[1]
        k_BHTD = k_BGTD.repeat_interleave(groups, dim=1)
        v_BHTD = v_BGTD.repeat_interleave(groups, dim=1)
        out_BHTD = torch.nn.functional.scaled_dot_product_attention(
            q_BHTD, k_BHTD, v_BHTD, is_causal=True, scale=self.softmax_scale
        )
        s, b = query.shape[0], query.shape[1]
        return out_BHTD.permute(2, 0, 1, 3).reshape(s, b, -1)


def _use_sdpa(model: torch.nn.Module) -> None:
    for layer in model.module.decoder.layers:
        attention = layer.self_attention
        attention.core_attention = SDPACoreAttention(attention.core_attention.softmax_scale)


@dataclasses.dataclass
class Contender:
    """One attention mode's model, optimizer and loss settings, and its step times."""

    name: str
    model: torch.nn.Module
    optimizer: object
    settings: object
    seconds: list[float] = dataclasses.field(default_factory=list)
    peak_bytes: int = 0
    first_lm_loss: float | None = None
    teacher: object = None
    """A distillation Teacher (None: no distillation)."""


def _contenders(args: argparse.Namespace, cfg, shape: LlamaShape) -> list[Contender]:
    from megatron_dmc.model.spec import use_transformer_engine
    from megatron_dmc.training import model_api
    from megatron_dmc.training.loss import LossSettings
    from megatron_dmc.training.optim import build_optimizer

    decisions = shape.num_hidden_layers * shape.num_key_value_heads * args.seq_length
    modes = [("vanilla", None), ("dmc", args.target_cr)]
    if not use_transformer_engine():
        modes.insert(1, ("vanilla_sdpa", None))
    out: list[Contender] = []
    for name, target in modes:
        model = model_api.build(shape, cfg, name.removesuffix("_sdpa"))
        if name == "vanilla_sdpa":
            _use_sdpa(model)
        if out:
            model.module.load_state_dict(out[0].model.module.state_dict(), strict=True)
        optimizer = build_optimizer(model, cfg.optim, cfg.model.bf16, False)
        out.append(Contender(name, model, optimizer, LossSettings(target, decisions)))
    if args.distill:
        out += [_distilled(name, args, cfg, shape, out[0]) for name in DISTILLED]
    if args.efficient:
        out.append(_distilled(EFFICIENT, args, cfg, shape, out[0]))
    if not args.no_transformers:
        from megatron_dmc.training.bench_hf import plain_transformers_step

        device = next(out[0].model.parameters()).device.type
        plain = plain_transformers_step(shape, cfg.optim, args.num_microbatches, device)
        out.append(Contender("transformers", plain.model, plain, None))
    return out


DISTILLED = ("dmc_distill", "dmc_lora_distill", "dmc_heads_lora_self")
"""DMC with KL to a frozen copy of the starting weights (all weights train, or LoRA only),
and heads-mode DMC with LoRA distilled from itself with compression off (no copy)."""

EFFICIENT = "dmc_efficient"
"""The efficient recipe (configs/recipes/efficient.yaml): decision heads, merge delay 64,
KL to the student with compression off as the only task loss, only the heads train."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a distilled contender changes in the DMC retrofit step."""

    trainable: str
    source: str = "channel"
    merge_delay: int = 0
    teacher_copy: bool = True
    lm_loss_weight: float = 1.0
    cr_loss_weight: float = 1.0


RECIPES = {
    "dmc_distill": Recipe("all"),
    "dmc_lora_distill": Recipe("lora"),
    "dmc_heads_lora_self": Recipe("lora", "heads", teacher_copy=False),
    EFFICIENT: Recipe("dmc-heads", "heads", 64, False, lm_loss_weight=0.0, cr_loss_weight=10.0),
}


def _distilled(name: str, args, cfg, shape: LlamaShape, vanilla: Contender) -> Contender:
    """DMC (retrofit step, KL weight 1) from `vanilla`'s weights as RECIPES[name] says: a
    frozen copy of them as teacher, or the student with compression off."""
    import copy

    from megatron_dmc.training import model_api
    from megatron_dmc.training.config import RetrofitArgs
    from megatron_dmc.training.loss import LossSettings
    from megatron_dmc.training.optim import build_optimizer
    from megatron_dmc.training.teacher import Teacher, frozen_copy

    recipe = RECIPES[name]
    cfg = copy.deepcopy(cfg)
    cfg.retrofit = RetrofitArgs(dmc_distill_weight=1.0, dmc_trainable=recipe.trainable,
                                dmc_lm_loss_weight=recipe.lm_loss_weight)  # fmt: skip
    cfg.dmc.dmc_decision_source = recipe.source
    cfg.dmc.dmc_merge_delay = recipe.merge_delay
    model = model_api.build(shape, cfg, "dmc")
    state = vanilla.model.module.state_dict()
    missing, unexpected = model.module.load_state_dict(state, strict=False)
    fresh = ("lora_A", "lora_B", "dmc_decision_proj.weight")
    assert not unexpected and all(k.endswith(fresh) for k in missing), missing
    teacher_model = None
    if recipe.teacher_copy:
        teacher_model = frozen_copy(shape, model_api.transformer_config(shape, cfg))
        teacher_model.load_state_dict(state, strict=True)
    optimizer = build_optimizer(model, cfg.optim, cfg.model.bf16, False)
    decisions = shape.num_hidden_layers * shape.num_key_value_heads * args.seq_length
    settings = LossSettings(args.target_cr, decisions, recipe.cr_loss_weight,
                            recipe.lm_loss_weight, distill_weight=1.0)  # fmt: skip
    teacher = Teacher(teacher_model, args.seq_length)
    return Contender(name, model, optimizer, settings, teacher=teacher)


def state_bytes(contender: Contender, tokens: int) -> dict[str, int]:
    """Bytes held besides the student's activations: its weights (and the trainable part),
    optimizer state, the teacher's weights, and the teacher logits of one step (`tokens`
    per step), which wait on the last pipeline stage for the student's loss."""
    params = list(contender.model.module.parameters())
    trainable = [p for p in params if p.requires_grad]
    inner = getattr(contender.optimizer, "optimizer", None)
    state = getattr(inner, "state", {}) if inner is not None else {}
    moments = ("exp_avg", "exp_avg_sq")
    optimizer = sum(s[k].nbytes for s in state.values() for k in moments if k in s)
    teacher, logits = 0, 0
    if contender.teacher is not None and contender.teacher.copy is None:
        output = contender.model.module.shared_embedding_or_output_weight()
        logits = tokens * output.shape[0] * output.element_size()
    elif contender.teacher is not None:
        copy = contender.teacher.copy
        teacher = sum(p.nbytes for p in copy.parameters())
        output = copy.shared_embedding_or_output_weight()
        logits = tokens * output.shape[0] * output.element_size()
    return {
        "weights": sum(p.nbytes for p in params),
        "trainable": sum(p.nbytes for p in trainable),
        "optimizer": optimizer,
        "teacher": teacher,
        "teacher_logits": logits,
    }


def _step(contender: Contender, args: argparse.Namespace, batch: dict, iteration: int) -> None:
    """One training step; the first one's LM loss is kept (all models start equal)."""
    from megatron_dmc.training.step import train_step

    if contender.name == "transformers":
        loss = contender.optimizer(batch)
        contender.first_lm_loss = contender.first_lm_loss or loss
        return
    if contender.name.startswith("dmc"):
        contender.model.module.collector.start_step(iteration)
        contender.model.module.collector.reset_stats()
    result = train_step(
        contender.model,
        contender.optimizer,
        itertools.repeat(batch),
        args.num_microbatches,
        args.seq_length,
        args.micro_batch_size,
        contender.settings,
        contender.teacher,
    )
    if contender.first_lm_loss is None:
        contender.first_lm_loss = result.stats["lm_loss_sum"] / result.stats["tokens"]


def _timed_step(contender: Contender, args, batch: dict, iteration: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _, seconds = timed(lambda: _step(contender, args, batch, iteration), device)
    if device == "cuda":
        contender.peak_bytes = max(contender.peak_bytes, torch.cuda.max_memory_allocated())
    return seconds


def measure(args: argparse.Namespace, contenders: list[Contender], batch: dict, device: str):
    """Warm-up, then timed steps alternating the order of the two models each round."""
    for iteration in range(args.warmup + args.reps):
        order = contenders if iteration % 2 == 0 else contenders[::-1]
        for contender in order:
            seconds = _timed_step(contender, args, batch, iteration, device)
            if iteration >= args.warmup:
                contender.seconds.append(seconds)


def report(args: argparse.Namespace, shape: LlamaShape, contenders: list[Contender], device: str):
    """Printed lines and the result numbers."""
    tokens = args.seq_length * args.micro_batch_size * args.num_microbatches
    medians = {c.name: statistics.median(c.seconds) for c in contenders}
    times = {c.name: c.seconds for c in contenders}
    baseline = "vanilla_sdpa" if "vanilla_sdpa" in medians else "vanilla"
    ratio = medians["dmc"] / medians[baseline]
    per_round = statistics.median(d / v for v, d in zip(times[baseline], times["dmc"]))
    lines = [
        f"model {args.model}: {shape.num_hidden_layers} layers, hidden {shape.hidden_size}, "
        f"{shape.num_attention_heads} heads / {shape.num_key_value_heads} KV, head dim "
        f"{shape.head_dim}, vocab {shape.vocab_size}; {args.num_microbatches} x "
        f"{args.micro_batch_size} x {args.seq_length} tokens per step, "
        f"{'bf16' if args.bf16 else 'fp32'}, {device}, {torch.get_num_threads()} thread(s)",
        f"clock: {clock_name(device)}; {args.warmup} warm-up + {args.reps} timed steps each",
    ]
    for c in contenders:
        memory = f", peak {c.peak_bytes / 2**30:.2f} GiB" if c.peak_bytes else ""
        lines.append(
            f"{c.name:>16}: median {medians[c.name] * 1e3:.1f} ms/step "
            f"(min {min(c.seconds) * 1e3:.1f}, max {max(c.seconds) * 1e3:.1f}), "
            f"{tokens / medians[c.name]:.0f} tokens/s{memory}; first-step LM loss "
            f"{c.first_lm_loss:.6f}"
        )
    for name in [c.name for c in contenders if c.name != "dmc"]:
        lines.append(
            f"{name} / DMC step time: {medians[name] / medians['dmc']:.3f}x"
            if name in RECIPES
            else f"DMC / {name} step time: {medians['dmc'] / medians[name]:.3f}x"
        )
    memory = {c.name: state_bytes(c, tokens) for c in contenders if c.name.startswith("dmc")}
    for name, held in memory.items():
        mib = {k: f"{v / 2**20:.1f}" for k, v in held.items()}
        lines.append(
            f"{name:>16}: weights {mib['weights']} MiB (trainable {mib['trainable']}), "
            f"optimizer state {mib['optimizer']} MiB, teacher weights {mib['teacher']} MiB, "
            f"teacher logits {mib['teacher_logits']} MiB"
        )
    if "transformers" in medians:
        per_token = {name: seconds / tokens for name, seconds in medians.items()}
        lines.append("CPU-s per token: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in per_token.items())
                     + f"; DMC / transformers {per_token['dmc'] / per_token['transformers']:.3f}x "
                     "(goal <= 1.1x for a whole retrofit run, launches and checkpoints included)")  # fmt: skip
        if EFFICIENT in per_token:
            ratio_efficient = per_token[EFFICIENT] / per_token["transformers"]
            lines.append(f"{EFFICIENT} / transformers CPU-s per token: {ratio_efficient:.3f}x")
    verdict = "met" if ratio <= GOAL else "NOT met"
    lines.append(
        f"goal DMC / {baseline} <= {GOAL}x: {verdict} ({ratio:.3f}x; median of per-round "
        f"ratios {per_round:.3f}x)"
    )
    result = {"ratio": ratio, "baseline": baseline, "per_round_ratio": per_round}
    result["first_lm_loss"] = {c.name: c.first_lm_loss for c in contenders}
    result["state_bytes"] = memory
    result["peak_bytes"] = {c.name: c.peak_bytes for c in contenders}
    return lines, {**result, "median_s": medians}


def _overheads(args: argparse.Namespace, cfg, contenders: list[Contender]) -> dict | None:
    if not args.overheads:
        return None
    from megatron_dmc.training.overheads import checkpoint_cpu_s, launch_cpu_s

    dmc = next(c for c in contenders if c.name == "dmc")
    return {"launch_cpu_s": launch_cpu_s(), **checkpoint_cpu_s(dmc.model, dmc.optimizer, cfg)}


def main(argv: Sequence[str] | None = None) -> dict:
    from megatron_dmc.compat import cuda_available
    from megatron_dmc.distributed import destroy_distributed, initialize_distributed
    from megatron_dmc.training.validate import validate

    args = build_parser().parse_args(argv)
    _check(args)
    cfg = _train_config(args)
    shape = model_shape(args)
    validate(cfg, world_size=1)
    device = "cuda" if cuda_available() else "cpu"
    initialize_distributed(1, 1, seed=cfg.batch.seed)
    try:
        contenders = _contenders(args, cfg, shape)
        measure(args, contenders, _batch(args, shape.vocab_size, device), device)
        overheads = _overheads(args, cfg, contenders)
    finally:
        destroy_distributed()
    lines, result = report(args, shape, contenders, device)
    if overheads:
        from megatron_dmc.training.overheads import lines as overhead_lines

        tokens = args.seq_length * args.micro_batch_size * args.num_microbatches
        dmc_s = result["median_s"]["dmc"]
        lines += overhead_lines(overheads, tokens, dmc_s / tokens)
        result["overheads"] = overheads
    print("\n".join(lines), flush=True)
    return result


if __name__ == "__main__":
    from megatron_dmc.cli_errors import run

    raise SystemExit(run(main))
