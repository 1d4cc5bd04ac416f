"""Achieved vs target compression ratio of a run, from its metrics.jsonl.

    python -m megatron_dmc.training.summary RUN_DIR [--last N]

prints the mean achieved CR over the last N logged steps (default 1) against the target
and the CR per layer of the last one; exits 1 when the target was not reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_dmc.training.metrics import METRICS_FILE

TOLERANCE = 0.1
"""A run reaches its target when its CR is at least (1 - TOLERANCE) x the target."""


def reached(achieved: float, target: float) -> bool:
    """Over-compression counts as reached: the CR loss is one-sided."""
    return achieved >= (1.0 - TOLERANCE) * target


def verdict(achieved: float, target: float) -> str:
    gap = (achieved - target) / target
    ok = "reached" if reached(achieved, target) else "NOT reached"
    return f"final achieved CR {achieved:.3f} vs target {target:.3f} ({gap * 100:+.1f}%): {ok}"


def dmc_records(run_dir: str | Path) -> list[dict]:
    """The logged steps of a run that measured a CR."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: give the --save directory of a training run")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("achieved_cr") is not None]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="achieved vs target CR of a training run")
    parser.add_argument("run_dir", help="the run's --save directory")
    parser.add_argument("--last", type=int, default=1, help="average over this many steps")
    args = parser.parse_args(argv)
    records = dmc_records(args.run_dir)[-args.last :]
    if not records:
        print(f"{args.run_dir}: no DMC step logged yet", file=sys.stderr)
        return 1
    achieved = sum(r["achieved_cr"] for r in records) / len(records)
    target = records[-1]["target_cr"]
    print(f"iteration {records[-1]['iteration']}, stage {records[-1]['stage']}")
    print("CR per layer: " + " ".join(f"{cr:.2f}" for cr in records[-1].get("layer_cr", [])))
    print(verdict(achieved, target))
    return 0 if reached(achieved, target) else 1


if __name__ == "__main__":
    sys.exit(main())
