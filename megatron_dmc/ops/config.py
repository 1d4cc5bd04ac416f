"""The DMC hyperparameters of one attention layer."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_dmc.ops._checks import check_window


@dataclass(frozen=True)
class DMCConfig:
    window: int = 12
    """Tokens a merged slot averages at most (the release's ring buffer); training matches."""

    init_value: float = 5.0
    """c: alpha logit = k[D-1] - c, omega = sigmoid(q[D-1] + c). c = 5 gives alpha ~ 0.0067."""

    temperature: float = 0.1
    """Gumbel-sigmoid temperature, constant through training."""

    def __post_init__(self) -> None:
        check_window(self.window)
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 (the paper uses 0.1); got {self.temperature!r}"
            )
