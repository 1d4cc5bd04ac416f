"""Console, tensorboard and metrics.jsonl output of the train loop (one writing rank).

metrics.jsonl has one JSON object per logged step: iteration, stage, stage_step and the
scalars (lm_loss, cr_loss, target_cr, achieved_cr, lr, grad_norm, tokens_per_s, ...), and
when asked the per-layer and per-head CR lists.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"

_CONSOLE = (
    ("lm_loss", "lm {:.4f}"),
    ("kl_loss", "kl {:.5f}"),
    ("cr_loss", "cr-loss {:.4f}"),
    ("achieved_cr", "cr {:.3f}"),
    ("target_cr", "/ {:.3f}"),
    ("zero_out_scale", "lambda {:.3f}"),
    ("lr", "lr {:.2e}"),
    ("grad_norm", "grad {:.3f}"),
    ("tokens_per_s", "{:.0f} tok/s"),
    ("step_ms", "{:.0f} ms"),
    ("valid_lm_loss", "valid {:.4f}"),
)


def console_line(record: dict[str, Any]) -> str:
    head = f"iter {record['iteration']:>7d} | {record['stage']} {record['stage_step']:>6d}"
    parts = [fmt.format(record[key]) for key, fmt in _CONSOLE if record.get(key) is not None]
    return " | ".join([head, *parts])


class MetricsWriter:
    """Writes on the rank that holds the loss (last pipeline stage, first TP and DP rank);
    every other rank gets `enabled=False` and writes nothing."""

    def __init__(
        self,
        run_dir: str | None,
        tensorboard_dir: str | None,
        enabled: bool,
        resume_from: int = 0,
    ) -> None:
        """`resume_from`: the iteration the run starts after; records of later iterations
        (written before a crash, to be redone now) are dropped from both outputs."""
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            path = Path(run_dir) / METRICS_FILE
            drop_records_after(path, resume_from)
            self._jsonl = path.open("a", encoding="utf-8")
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=tensorboard_dir, purge_step=resume_from + 1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        print(console_line(record), flush=True)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(_finite(record)) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            self._tensorboard(record)

    def _tensorboard(self, record: dict[str, Any]) -> None:
        step = record["iteration"]
        for key, value in record.items():
            if isinstance(value, float | int) and key not in ("iteration", "stage_step"):
                self._tb.add_scalar(f"train/{key}", value, step)
        for layer, cr in enumerate(record.get("layer_cr") or []):
            self._tb.add_scalar(f"cr_layer/{layer:03d}", cr, step)
        for layer, heads in enumerate(record.get("layer_head_cr") or []):
            for head, cr in enumerate(heads):
                self._tb.add_scalar(f"cr_head/{layer:03d}/{head:03d}", cr, step)
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def drop_records_after(path: Path, iteration: int) -> None:
    """Keep only the records of iterations <= `iteration` in the metrics.jsonl at `path`
    (and any torn last line of a killed run goes too); rewritten atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("iteration", 0) <= iteration:
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no inf/nan: write them as strings."""

    def fix(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    return {k: fix(v) for k, v in record.items()}
