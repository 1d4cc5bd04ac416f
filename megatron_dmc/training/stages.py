"""The three stages of a retrofit and where a launch starts among them.

zero_out: plain attention, channel D-1 of q/k scaled by lambda(step), weight rows zeroed at
          the end of the stage.
retrofit: DMC attention, CR loss with the target ramping linearly 1 -> CR*.
finetune: DMC attention, CR loss at CR*, learning rate decaying to --min-lr.

Outside the retrofit, `plain` is continued training with vanilla attention and the LM loss
only (--lr, decaying to --min-lr over its last --plain-decay-iters steps).

A checkpoint records its stage and the steps done in it; a launch continues there (so the
ramp continues where it was) or, when that stage is complete, at the next one.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_dmc.ops import CRSchedule, ZeroOutSchedule
from megatron_dmc.training.config import PLAIN, STAGES, DMCArgs


@dataclass(frozen=True)
class Stage:
    name: str
    """One of STAGES."""

    iters: int
    """Optimizer steps in this stage."""

    dmc: DMCArgs
    """The run's DMC settings (target CR, ramp, anneal length)."""

    @property
    def attention(self) -> str:
        """The attention variant the model is built with in this stage."""
        return {"zero_out": "zero_out", PLAIN: "vanilla"}.get(self.name, "dmc")

    def target_cr(self, step: int) -> float | None:
        """CR the loss asks for at this step (None: no CR loss)."""
        if self.name in ("zero_out", PLAIN):
            return None
        if self.name == "finetune":
            return self.dmc.dmc_target_cr
        return CRSchedule(self.dmc.dmc_target_cr, int(self.dmc.dmc_ramp_iters))(step)

    def zero_out_scale(self, step: int) -> float | None:
        """lambda of channel D-1 at this step (None outside zero_out)."""
        if self.name != "zero_out":
            return None
        return ZeroOutSchedule(self.dmc.dmc_zero_out_anneal_iters)(step)

    @property
    def decay_iters(self) -> int:
        """The last steps of the stage over which the LR decays from --lr to --min-lr."""
        if self.name == PLAIN:
            return self.dmc.plain_decay_iters
        return self.iters if self.name == "finetune" else 0


def plan(dmc: DMCArgs) -> list[Stage]:
    """The stages this launch runs, in order."""
    return [Stage(name, dmc.stage_iters(name), dmc) for name in dmc.stages]


@dataclass
class Position:
    stage_index: int
    """Index into the plan."""

    step: int
    """Steps already done in that stage."""


def start_position(stages: list[Stage], stage: str | None, step: int, done: bool) -> Position:
    """Where to start given the checkpoint's (stage, steps done, stage complete).

    `stage=None` is a checkpoint without DMC state (a converted vanilla model, or none):
    the launch starts at the beginning of its first stage.
    """
    names = [s.name for s in stages]
    if stage is None:
        return Position(0, 0)
    if stage not in (*STAGES, PLAIN):
        raise ValueError(f"checkpoint has unknown DMC stage {stage!r}")
    if stage in names:
        index = names.index(stage)
        if done or step >= stages[index].iters:
            return Position(index + 1, 0)
        return Position(index, step)
    if PLAIN in (stage, names[0]):
        raise ValueError(
            f"the checkpoint is at stage {stage} but this launch runs {names[0]}: plain "
            "training and the DMC stages do not continue each other; take its weights only "
            "(--load DIR --finetune, another --save)"
        )
    order = STAGES.index
    if order(stage) > order(names[0]):
        raise ValueError(
            f"the checkpoint is at stage {stage}, later than --dmc-stage {names[0]}; "
            f"load an earlier checkpoint or run --dmc-stage {stage}"
        )
    if order(stage) < order(names[0]) - 1 or not done:
        missing = STAGES[order(stage) : order(names[0])]
        raise ValueError(
            f"the checkpoint has not finished stage(s) {', '.join(missing)} "
            f"(it is at {stage} step {step}); run them first, e.g. --dmc-stage all"
        )
    return Position(0, 0)
