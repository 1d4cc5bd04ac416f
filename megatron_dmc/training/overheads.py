"""What a training launch pays besides its steps: process start-up and checkpoint I/O.

Measured by the training benchmark (`--overheads`) on the DMC contender after its steps
(so the AdamW moments exist): one checkpoint save and load through the trainer's own
`save_checkpoint` / `load_checkpoint`, and the CPU time of a `torchrun` launch of the
trainer that stops after parsing its flags (interpreter, torch, Megatron-Core imports).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def launch_cpu_s() -> float:
    """CPU seconds of `torchrun ... -m megatron_dmc.train --help` (start-up, imports)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=1", "-m", "megatron_dmc.train", "--help"]  # fmt: skip
    before = children_cpu_s()
    subprocess.run(command, check=True, capture_output=True)
    return children_cpu_s() - before


def checkpoint_cpu_s(model, optimizer, cfg) -> dict[str, float]:
    """CPU seconds of one save and one load of (model, optimizer), and the bytes written."""
    from megatron_dmc.training import checkpoint as ckpt

    with tempfile.TemporaryDirectory() as root:
        progress = ckpt.Progress(iteration=1, stage="retrofit")
        start = time.process_time()
        saved = ckpt.save_checkpoint(root, model, optimizer, progress, {"args": cfg.flat()})
        save_s = time.process_time() - start
        size = sum(f.stat().st_size for f in Path(saved).rglob("*") if f.is_file())
        start = time.process_time()
        ckpt.load_checkpoint(root, model, optimizer)
        load_s = time.process_time() - start
    return {"save_cpu_s": save_s, "load_cpu_s": load_s, "checkpoint_mb": size / 1e6}


def lines(result: dict[str, float], tokens_per_step: int, per_token_s: float) -> list[str]:
    """Printed summary: each overhead and what it adds per token to a 100-step launch."""
    fixed = result["launch_cpu_s"] + result["load_cpu_s"] + result["save_cpu_s"]
    per_launch = fixed / (100 * tokens_per_step)
    return [
        f"overheads: launch {result['launch_cpu_s']:.1f} CPU-s, checkpoint save "
        f"{result['save_cpu_s']:.1f} CPU-s ({result['checkpoint_mb']:.0f} MB), load "
        f"{result['load_cpu_s']:.1f} CPU-s",
        f"a 100-step launch (one load, one save) adds {per_launch * 1e3:.3f} ms per token = "
        f"{per_launch / per_token_s:.3f}x the DMC step's CPU-s per token",
    ]
