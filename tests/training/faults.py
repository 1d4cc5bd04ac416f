"""Faults injected into real tiny runs: a NaN gradient at one step, a SIGKILL mid-save.

`python -m tests.training.faults SAVE INIT POINT` runs TINY with --save-interval 1 and
kills itself (SIGKILL, no cleanup) while saving iteration 3, at POINT: `shards` (a shard
half written), or `tracker` (iteration 3 renamed into place, the tracker not yet updated).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

KILLED_AT = 3


def poison_gradient(at_step: int, layer: int, seen: dict[str, Any], rank: int | None = None):
    """A stand-in for step.run_batches that, at the `at_step`-th training step of this
    launch, writes NaN into one gradient of global `layer` (0-based; on the ranks holding
    it, or on `rank` only) and keeps the parameters as they were before the update in
    `seen`."""
    import inspect

    import torch.distributed as dist

    from megatron_dmc.training import step

    real = step.run_batches
    steps = []

    def run_batches(model, data, *args):
        result = real(model, data, *args)
        forward_only = inspect.signature(real).bind(model, data, *args).arguments["forward_only"]
        if not forward_only:
            steps.append(1)
            if len(steps) == at_step and rank in (None, dist.get_rank()):
                for module in model.module.modules():
                    if getattr(module, "layer_number", None) == layer + 1 and hasattr(
                        module, "mlp"
                    ):
                        module.mlp.linear_fc1.weight.main_grad.view(-1)[0] = float("nan")
                seen["model"] = model
                seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return result

    return run_batches


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_in_shards(real_save):
    def save(state, directory, *args, **kwargs):
        real_save(state, directory, *args, **kwargs)
        if directory.endswith(f"iter_{KILLED_AT:07d}.tmp"):
            shard = sorted(Path(directory).glob("*.distcp"))[0]
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
            _die()

    return save


def _kill_before_tracker(real_write):
    def write(root, iteration):
        if iteration == KILLED_AT:
            _die()
        real_write(root, iteration)

    return write


def main(save: str, init: str, point: str) -> None:
    from megatron_dmc.training import checkpoint as ckpt
    from tests.training.helpers import run_tiny

    if point == "shards":
        ckpt.dist_checkpointing.save = _kill_in_shards(ckpt.dist_checkpointing.save)
    else:
        ckpt._write_tracker = _kill_before_tracker(ckpt._write_tracker)
    torch.set_num_threads(1)
    run_tiny(Path(save), init, "--save-interval", "1")


if __name__ == "__main__":
    main(*sys.argv[1:])
