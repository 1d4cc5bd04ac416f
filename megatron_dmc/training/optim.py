"""The optimizer: Megatron's (distributed) optimizer on GPU, AdamW with a TP-aware global
gradient norm on CPU, behind one small interface; and the per-stage LR schedule.

Both read gradients from the grad buffers of Megatron's DDP wrapper (`param.main_grad`),
which hold the data-parallel mean after `finalize_model_grads`.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from megatron_dmc.compat import cpu_device_mode, cuda_available
from megatron_dmc.model.qkv import RowSelector
from megatron_dmc.training.config import OptimizerArgs
from megatron_dmc.training.stages import Stage


class Optimizer(Protocol):
    """What the train loop needs from an optimizer (Megatron's optimizers have it)."""

    param_groups: list[dict[str, Any]]

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self) -> tuple[bool, float | None, Any]: ...

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False): ...

    def load_state_dict(self, state_dict: dict) -> None: ...


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.dim() == 1 or name.endswith(".bias")


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "wd_mult": 1.0, "weight_decay": weight_decay},
        {"params": no_decay, "wd_mult": 0.0, "weight_decay": 0.0},
    ]


class CpuAdamW:
    """torch AdamW over the DDP grad buffers, clipped by the norm over all model-parallel
    ranks (tensor-parallel duplicates and the tied embedding copy counted once)."""

    def __init__(self, model: torch.nn.Module, args: OptimizerArgs) -> None:
        self.clip_grad = args.clip_grad
        self.row_lr_mult: tuple[list[RowSelector], float] = ([], 1.0)
        self.optimizer = torch.optim.AdamW(
            _param_groups(model, args.weight_decay),
            lr=args.lr,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_eps,
            foreach=True,
        )

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The live groups of the inner AdamW (`load_state_dict` replaces its list, so a
        copy taken at construction would stop reaching it)."""
        return self.optimizer.param_groups

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.parameters():
            param.grad = None

    def grad_norm(self) -> float:
        grads = [
            p.grad
            for p in self.parameters()
            if p.grad is not None
            and param_is_not_shared(p)
            and param_is_not_tensor_parallel_duplicate(p)
        ]
        with cpu_device_mode():
            return get_grad_norm_fp32(
                grads, grad_stats_parallel_group=parallel_state.get_model_parallel_group()
            )

    @torch.no_grad()
    def step(self) -> tuple[bool, float | None, None]:
        for param in self.parameters():
            param.grad = param.main_grad
        norm = self.grad_norm()
        if not math.isfinite(norm):
            return False, norm, None
        if self.clip_grad > 0 and norm > self.clip_grad:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, self.clip_grad / (norm + 1.0e-6))
        selectors, mult = self.row_lr_mult
        before = [view(param).clone() for param, view in selectors] if mult != 1.0 else []
        self.optimizer.step()
        for (param, view), old in zip(selectors, before):
            rows = view(param)
            rows.add_(rows - old, alpha=mult - 1.0)
        return True, norm, None

    @torch.no_grad()
    def restart_moments(self, selectors: list[RowSelector]) -> None:
        """Zero AdamW's first and second moments of the selected rows."""
        for param, view in selectors:
            state = self.optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    view(state[key]).zero_()

    def _init_state(self) -> None:
        for param in self.parameters():
            if not self.optimizer.state[param]:
                self.optimizer.state[param] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(param),
                    "exp_avg_sq": torch.zeros_like(param),
                }

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False):
        """Moments as ShardedTensors beside the model's (so they reshard like the weights)."""
        if is_loading:
            self._init_state()
        state = self.optimizer.state_dict()
        state["state"] = {k: dict(v) for k, v in state["state"].items()}  # live dicts inside
        steps = [s.pop("step") for s in state["state"].values()]
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.parameters())
        optim_state_to_sharding_state(state, id_map)
        state["common_step"] = float(steps[0]) if steps else 0.0
        return state

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """A `state_dict()`, or a loaded `sharded_state_dict()` (shared step)."""
        if "common_step" in state_dict:
            step = state_dict.pop("common_step")
            for param_state in state_dict["state"].values():
                param_state["step"] = torch.tensor(step)
        state_dict["param_groups"] = [
            {**saved, "params": live["params"]}
            for saved, live in zip(
                state_dict["param_groups"], self.optimizer.state_dict()["param_groups"]
            )
        ]
        self.optimizer.load_state_dict(state_dict)


def _grad_of(param: torch.nn.Parameter) -> torch.Tensor | None:
    return getattr(param, "main_grad", None) if param.grad is None else param.grad


def _ordered_grads(model: torch.nn.Module) -> list[tuple[int, str, torch.Tensor]]:
    """(place, description, gradient) of every parameter with one; place orders the model
    front to back over pipeline stages: 0 embedding, n for global layer n, then the rest."""
    inner = getattr(model, "module", model)
    layer_of: dict[int, tuple[int, str]] = {}
    for module in inner.modules():
        if type(module).__name__ == "TransformerLayer":
            for name, param in module.named_parameters():
                layer_of[id(param)] = (module.layer_number, name)
    out = []
    for name, param in inner.named_parameters():
        grad = _grad_of(param)
        if grad is None:
            continue
        if id(param) in layer_of:
            number, local = layer_of[id(param)]
            out.append((number, f"layer {number - 1} ({local})", grad))
        else:
            out.append((0 if "embedding" in name else 2**31, name, grad))
    return out


@torch.no_grad()
def first_non_finite_grad(model: torch.nn.Module) -> str | None:
    """Collective over all ranks: None when every gradient (DP-reduced `main_grad`) is
    finite, else where the first non-finite one is (the same answer on every rank)."""
    grads = _ordered_grads(model)
    norms = [n.float() for n in torch._foreach_norm([g for _, _, g in grads])] if grads else []
    finite = torch.isfinite(torch.stack(norms)).tolist() if norms else []  # one device sync
    bad = [(place, text) for (place, text, _), ok in zip(grads, finite) if not ok]
    first = min(bad, key=_place, default=(math.inf, ""))
    flag = torch.tensor([float(first[0])], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if math.isinf(flag.item()):
        return None
    found: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(found, first)
    return min(found, key=_place)[1]


def _place(found: tuple[float, str]) -> float:
    return found[0]


def restart_decision_moments(optimizer: Optimizer, selectors: list[RowSelector]) -> None:
    """At the end of zero_out the decision rows change role (from q.k features to decision
    and importance logits); Adam's moments built in their old role would scale their first
    DMC updates down by orders of magnitude, so they restart from zero. Megatron's optimizers
    keep their state in flat (possibly sharded) buffers: there, all moments restart."""
    if isinstance(optimizer, CpuAdamW):
        optimizer.restart_moments(selectors)
        return
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in inner.optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].zero_()


def set_decision_lr_mult(optimizer: Optimizer, selectors: list[RowSelector], mult: float) -> None:
    """Scale the AdamW update of the decision rows by `mult` (1: no change)."""
    if isinstance(optimizer, CpuAdamW):
        optimizer.row_lr_mult = (selectors, mult)
    elif mult != 1.0:
        raise ValueError(
            "--dmc-decision-lr-mult is implemented by the CPU optimizer only (Megatron's GPU "
            "optimizers update fp32 main copies this scaling would not reach); leave it at 1"
        )


def build_optimizer(model: torch.nn.Module, args: OptimizerArgs, bf16: bool, distributed: bool):
    """Megatron's optimizer on GPU (distributed if asked), CpuAdamW on CPU."""
    if not cuda_available():
        return CpuAdamW(model, args)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed,
    )
    return get_megatron_optimizer(config, [model])


def _lr_curve(stage: Stage, args: OptimizerArgs) -> dict[str, Any]:
    """OptimizerParamScheduler arguments: --lr, then down to --min-lr over the stage's last
    `decay_iters` steps (a decay shorter than the stage is Megatron's warmup-stable-decay)."""
    decay = stage.decay_iters
    if decay == 0:
        return {"lr_decay_style": "constant", "min_lr": args.lr}
    curve: dict[str, Any] = {"lr_decay_style": args.lr_decay_style, "min_lr": args.min_lr}
    if decay < stage.iters and args.lr_decay_style != "constant":
        curve.update(
            lr_decay_style="WSD", wsd_decay_steps=decay, lr_wsd_decay_style=args.lr_decay_style
        )
    return curve


def stage_lr_scheduler(
    optimizer: Optimizer, stage: Stage, args: OptimizerArgs, step: int, warmup_iters: int = 0
) -> OptimizerParamScheduler:
    """Constant --lr in zero_out and retrofit; --lr -> --min-lr over finetune, and over the
    last --plain-decay-iters steps of plain; after a linear warm-up from 0 over the first
    `warmup_iters` steps. Set to `step`."""
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup_iters else args.lr,
        max_lr=args.lr,
        lr_warmup_steps=warmup_iters,
        lr_decay_steps=max(stage.iters, 1),
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=max(stage.iters, 1),
        wd_incr_style="constant",
        **_lr_curve(stage, args),
    )
    scheduler.step(step)
    return scheduler
