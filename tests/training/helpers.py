"""Run the trainer here (a world of one) or in gloo processes, and read back its metrics."""

from __future__ import annotations

import json
from pathlib import Path

TINY_SHARED = [
    "--model", "tiny_gqa", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2",
    "--global-batch-size", "8", "--lr", "1e-3", "--min-lr", "1e-4",
]  # fmt: skip
"""Model, data, batch and optimizer of every tiny run (DMC or plain)."""

TINY = [
    *TINY_SHARED,
    "--dmc-zero-out-iters", "2", "--dmc-zero-out-anneal-iters", "1", "--dmc-ramp-iters", "2",
    "--dmc-finetune-iters", "1", "--dmc-target-cr", "2",
]  # fmt: skip
"""A whole three-stage run in 5 steps (4 micro-batches each) on the 4-layer GQA debug
model; checkpoints at the ends of the stages: iterations 2, 4 and 5."""

KEYS = ("lm_loss", "cr_loss", "achieved_cr", "target_cr", "grad_norm", "lr")
"""What the layout and resume comparisons look at."""


def train(argv: list[str], keep_world: bool = False):
    """One launch of the trainer in this process; returns its final Progress.

    `keep_world`: tear down only Megatron's groups, so that the next launch in the same
    ranks reuses the default process group (gloo cannot rejoin a destroyed one there).
    """
    from megatron.core import parallel_state

    from megatron_dmc.distributed import destroy_distributed
    from megatron_dmc.training.arguments import parse_args
    from megatron_dmc.training.loop import train as train_loop

    try:
        return train_loop(parse_args(argv))
    finally:
        if keep_world:
            parallel_state.destroy_model_parallel()
        else:
            destroy_distributed()


def run_tiny(save: Path, init: str | Path, *extra: str) -> dict[str, list]:
    """TINY from the weights at `init` (weights only); its curves by key."""
    train([*TINY, "--save", str(save), "--load", str(init), *extra])
    return curves(save)


def metrics(save: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(save) / "metrics.jsonl").read_text().splitlines()]


def curves(save: Path) -> dict[str, list]:
    records = metrics(save)
    return {key: [r.get(key) for r in records] for key in ("iteration", *KEYS)}


def save_initial_checkpoint(
    path: Path, model_name: str = "tiny_gqa", nan_in_layer: int | None = None
) -> Path:
    """A plain Megatron checkpoint (no DMC state), like the HF converter writes.

    Every layout starts from it: Megatron's own initialisation depends on the pipeline
    split, a loaded checkpoint does not. `nan_in_layer` (0-based) poisons that layer's MLP.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_dmc.distributed import destroy_distributed, initialize_distributed
    from megatron_dmc.model.builder import build_model
    from megatron_dmc.schema.llama import LlamaShape

    initialize_distributed(1, 1, seed=1234)
    try:
        model = build_model(LlamaShape.from_yaml(model_name), "vanilla")
        if nan_in_layer is not None:
            model.decoder.layers[nan_in_layer].mlp.linear_fc1.weight.data.fill_(float("nan"))
        target = path / "release"
        target.mkdir(parents=True)
        dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 0}, str(target))
        dist.barrier()
    finally:
        destroy_distributed()
    (path / "latest_checkpointed_iteration.txt").write_text("release\n")
    return path
