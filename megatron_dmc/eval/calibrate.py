"""The decision threshold that makes a trained model compress as much as asked, at the
length it will be used at (`python -m megatron_dmc.eval calibrate`).

A retrofit learns its decisions at the training length under a CR loss that only pushes
compression up to the target; at a longer evaluation length (and with a merge delay,
whose exact window weighs less in longer sequences) the same decisions usually compress
more than asked. Lowering every alpha logit by one scalar tau
(`DMCConfig.decision_threshold`, config.json `dmc_decision_threshold`) turns the least
confident merges (or evictions) back into appends, and leaves every other decision as
trained. The real CR is measured as the report measures it (continuation protocol,
`eval.perplexity`) on the text the caller gives: in the main job the training corpus,
never the held-out text. The search brackets the target, then narrows the bracket by
false position; it returns the largest tau whose real CR is still at least the target.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from megatron_dmc.eval.caches import set_decision_threshold
from megatron_dmc.eval.methods import build_method
from megatron_dmc.eval.perplexity import continuation_perplexity

CALIBRATION_FILE = "calibration.json"
MAX_THRESHOLD = 64.0
"""|tau| searched at most (decision-head logits are 100 x a projection; a tau this large
already turns almost every decision into an append, or a merge)."""


@dataclass
class CalibrationSettings:
    target_cr: float
    context_len: int = 1024
    continuation_len: int = 128
    samples: int = 2
    """Disjoint blocks of context_len + continuation_len tokens measured per probe."""
    tolerance: float = 0.02
    """Stop once the real CR is within [target, target * (1 + tolerance)]."""
    narrowing_probes: int = 10
    """Probes at most once the target is bracketed (bracketing takes at most 8)."""

    def __post_init__(self) -> None:
        if not self.target_cr >= 1.0:
            raise ValueError(f"target CR must be >= 1; got {self.target_cr!r}")
        if self.samples < 1 or self.narrowing_probes < 1 or not self.tolerance > 0:
            raise ValueError(
                "samples and narrowing probes must be >= 1 and tolerance > 0; got "
                f"{self.samples}, {self.narrowing_probes}, {self.tolerance}"
            )


@dataclass
class Calibration:
    target_cr: float
    threshold: float
    """The chosen tau."""
    real_cr: float
    """Real CR at tau on the calibration text."""
    uncalibrated_cr: float
    """Real CR at tau = 0 (as trained)."""
    settings: dict = field(default_factory=dict)
    probes: list[tuple[float, float]] = field(default_factory=list)
    """(tau, real CR) of every measurement, in order."""


def calibrate_threshold(
    model: nn.Module, token_ids: torch.Tensor, settings: CalibrationSettings
) -> Calibration:
    """Search tau for a loaded DMC/DMS model (left at the chosen tau) on `token_ids`."""

    def measure(threshold: float) -> float:
        set_decision_threshold(model, threshold)
        result = continuation_perplexity(
            model,
            build_method("dmc"),
            token_ids,
            settings.context_len,
            settings.continuation_len,
            max_samples=settings.samples,
        )
        return float(result.real_cr)

    calibration = search_threshold(measure, settings)
    set_decision_threshold(model, calibration.threshold)
    return calibration


def search_threshold(
    measure: Callable[[float], float], settings: CalibrationSettings
) -> Calibration:
    """The search itself, over any `measure(tau) -> real CR` that falls as tau grows."""
    probes: list[tuple[float, float]] = []

    def probe(threshold: float) -> float:
        probes.append((threshold, measure(threshold)))
        return probes[-1][1]

    uncalibrated = probe(0.0)
    bracket = _bracket(probe, uncalibrated, settings)
    if bracket is not None:
        _narrow(probe, bracket, settings)
    threshold, real_cr = _choice(probes, settings.target_cr)
    return Calibration(
        settings.target_cr, threshold, real_cr, uncalibrated, asdict(settings), probes
    )


def _accepted(real_cr: float, settings: CalibrationSettings) -> bool:
    return settings.target_cr <= real_cr <= settings.target_cr * (1 + settings.tolerance)


def _bracket(measure, cr_at_zero: float, settings: CalibrationSettings):
    """(tau_high_cr, tau_low_cr) around the target, or None when tau = 0 is accepted or
    no tau within MAX_THRESHOLD reaches the target. The real CR falls as tau grows."""
    if _accepted(cr_at_zero, settings):
        return None
    direction = 1.0 if cr_at_zero > settings.target_cr else -1.0
    inner, step = (0.0, cr_at_zero), 1.0
    while step <= MAX_THRESHOLD:
        outer = (direction * step, measure(direction * step))
        if (outer[1] > settings.target_cr) != (cr_at_zero > settings.target_cr):
            return (inner, outer) if direction > 0 else (outer, inner)
        inner, step = outer, step * 2
    return None


def _narrow(measure, bracket, settings: CalibrationSettings) -> None:
    """False position (Illinois) inside the bracket, aimed at the middle of the accepted
    band [target, target * (1 + tolerance)]."""
    (t_hi, cr_hi), (t_lo, cr_lo) = bracket
    weight_hi = weight_lo = 1.0
    aim, side = settings.target_cr * (1 + settings.tolerance / 2), 0
    for _ in range(settings.narrowing_probes):
        gap_hi, gap_lo = (cr_hi - aim) * weight_hi, (cr_lo - aim) * weight_lo
        tau = t_hi + (t_lo - t_hi) * gap_hi / (gap_hi - gap_lo)
        cr = measure(tau)
        if _accepted(cr, settings) or abs(t_lo - t_hi) < 1e-3:
            return
        if cr > aim:
            t_hi, cr_hi, weight_hi = tau, cr, 1.0
            weight_lo, side = (weight_lo / 2 if side == 1 else 1.0), 1
        else:
            t_lo, cr_lo, weight_lo = tau, cr, 1.0
            weight_hi, side = (weight_hi / 2 if side == -1 else 1.0), -1


def _choice(probes: list[tuple[float, float]], target: float) -> tuple[float, float]:
    """The largest tau whose real CR is at least the target; else the most compressing."""
    reaching = [p for p in probes if p[1] >= target]
    if reaching:
        return max(reaching, key=lambda p: p[0])
    return max(probes, key=lambda p: p[1])


def write_calibration(model_dir: str | Path, calibration: Calibration) -> None:
    """Set dmc_decision_threshold in config.json and record the search beside it (each file
    written whole to a temporary name, then renamed)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["dmc_decision_threshold"] = calibration.threshold
    _write_json(model_dir / "config.json", config)
    _write_json(model_dir / CALIBRATION_FILE, asdict(calibration))


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)
