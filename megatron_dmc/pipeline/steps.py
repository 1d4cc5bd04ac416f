"""Running the job as named steps: headers, timings, skipping what is already done.

A finished step leaves `steps/<name>.json` (wall and CPU seconds). A re-run skips a step
whose marker and outputs exist; `force` redoes it. Steps form a chain: once one runs, every
later step runs too (its inputs changed). A step that stopped half-way has no marker: a
resumable one (training) continues from its own outputs, any other starts afresh.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Step:
    name: str
    """Marker name, also accepted by --redo."""
    title: str
    """The stage header."""
    run: Callable[[], None]
    outputs: list[Path] = field(default_factory=list)
    """Paths the step creates; removed before a fresh start."""
    resumable: bool = False
    """Keep the outputs of an interrupted attempt (the step resumes from them)."""


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (user + system)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class StepRunner:
    """Runs steps in order; `force` (all) or `redo` (names) ignore finished markers."""

    def __init__(self, done_dir: Path, force: bool = False, redo: tuple[str, ...] = ()) -> None:
        self.done_dir = done_dir
        self.force = force
        self.redo = set(redo)
        self.count = 0
        self.dirty = False
        """A step ran in this invocation: the later ones must not reuse old outputs."""

    def marker(self, name: str) -> Path:
        return self.done_dir / f"{name}.json"

    def is_done(self, step: Step) -> bool:
        done = self.marker(step.name).is_file() and all(p.exists() for p in step.outputs)
        return done and not (self.force or self.dirty or step.name in self.redo)

    def __call__(self, step: Step) -> None:
        self.count += 1
        header = f"== [{self.count}] {step.title}"
        if self.is_done(step):
            print(f"{header}: done before, skipped (--force redoes it)", flush=True)
            return
        print(f"\n{header}", flush=True)
        fresh = self.force or self.dirty or step.name in self.redo or not step.resumable
        self.dirty = True
        if fresh:
            for path in step.outputs:
                _remove(path)
        self.marker(step.name).unlink(missing_ok=True)
        wall, cpu = time.perf_counter(), cpu_seconds()
        step.run()
        timing = {"wall_s": time.perf_counter() - wall, "cpu_s": cpu_seconds() - cpu}
        self.done_dir.mkdir(parents=True, exist_ok=True)
        self.marker(step.name).write_text(json.dumps(timing) + "\n")
        print(f"   {step.name}: {timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU")


def read_timings(done_dir: Path) -> dict[str, dict[str, float]]:
    """{step name: {"wall_s", "cpu_s"}} of every finished step, in the order they finished."""
    markers = sorted(done_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
    return {p.stem: json.loads(p.read_text()) for p in markers}
