"""Per-step records (what metrics.jsonl and the console get) and the non-finite step check.

Legend: L layers, N KV heads (whole model).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_dmc.ops import achieved_compression_ratio
from megatron_dmc.schema.llama import LlamaShape
from megatron_dmc.training.step import StepResult
from megatron_dmc.training.summary import verdict


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient became NaN or inf; the run stops without applying that step
    (and without saving it)."""


class LayerWatch:
    """Forward hooks flagging, per global layer number, an output that was not finite."""

    def __init__(self, model: torch.nn.Module, num_layers: int) -> None:
        self.bad_L = torch.zeros(num_layers, dtype=torch.float64)
        self._handles = [
            layer.register_forward_hook(self._hook)
            for layer in model.modules()
            if type(layer).__name__ == "TransformerLayer"
        ]

    def _hook(self, layer: torch.nn.Module, args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if not torch.isfinite(hidden.detach()).all():
            self.bad_L[layer.layer_number - 1] = 1.0

    def first_bad_layer(self) -> int | None:
        """Collective: the first layer (0-based) that produced a non-finite output."""
        bad_L = self.bad_L.clone()
        dist.all_reduce(bad_L, op=dist.ReduceOp.MAX)
        bad = torch.nonzero(bad_L).flatten().tolist()
        return bad[0] if bad else None

    def reset(self) -> None:
        self.bad_L.zero_()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def cr_from_alpha(alpha: float) -> float:
    return achieved_compression_ratio(alpha)


class StepRecorder:
    """Turns step results into records and keeps the last per-(layer, head) CR."""

    def __init__(self, model_config: LlamaShape) -> None:
        self.model_config = model_config
        self.layer_head_cr: list[list[float]] | None = None
        self.last: dict[str, Any] | None = None

    def check_finite(
        self, result: StepResult, iteration: int, stage: str, watch: LayerWatch
    ) -> str | None:
        """Collective: None for a finite step, else what was not finite and where (the
        step, and the first layer with a non-finite output or gradient)."""
        if result.finite and result.bad_grad is None:
            watch.reset()
            return None
        step = f"iteration {iteration} (stage {stage})"
        if result.finite:
            watch.reset()
            return f"non-finite gradient at {step} with a finite loss; first in {result.bad_grad}"
        layer = watch.first_bad_layer()
        watch.reset()
        where = "" if layer is None else f"; first non-finite layer output: layer {layer}"
        return (
            f"non-finite loss at {step}: lm_loss_sum={result.stats['lm_loss_sum']}, "
            f"cr_loss_sum={result.stats['cr_loss_sum']}{where}"
        )

    def record(
        self,
        base: dict[str, Any],
        result: StepResult,
        alpha_LN: torch.Tensor | None,
        decisions_per_sequence: int,
        target_cr: float | None,
    ) -> dict[str, Any]:
        stats = result.stats
        record = dict(base)
        record["lm_loss"] = stats["lm_loss_sum"] / max(stats["tokens"], 1.0)
        record["grad_norm"] = result.grad_norm
        record["target_cr"] = target_cr
        if alpha_LN is not None:
            alpha = stats["alpha_sum"] / (stats["sequences"] * decisions_per_sequence)
            record["cr_loss"] = stats["cr_loss_sum"] / max(stats["sequences"], 1.0)
            record["alpha_mean"] = alpha
            record["achieved_cr"] = cr_from_alpha(alpha)
            record["layer_cr"] = [cr_from_alpha(a) for a in alpha_LN.mean(dim=1).tolist()]
            self.layer_head_cr = [[cr_from_alpha(a) for a in row] for row in alpha_LN.tolist()]
            record["layer_head_cr"] = self.layer_head_cr
        self.last = record
        return record

    def summary(self) -> str:
        last = self.last or {}
        achieved, target = last.get("achieved_cr"), last.get("target_cr")
        if achieved is None or target is None:
            return f"finished at iteration {last.get('iteration')} (no DMC stage ran)"
        return verdict(achieved, target)
