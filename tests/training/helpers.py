"""Run the trainer in gloo processes and read back its metrics."""

from __future__ import annotations

import json
from pathlib import Path

from tests.dist_utils import run_distributed

TINY = [
    "--model", "tiny_gqa", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2",
    "--dmc-zero-out-iters", "2", "--dmc-zero-out-anneal-iters", "1", "--dmc-ramp-iters", "2",
    "--dmc-finetune-iters", "1", "--dmc-target-cr", "2", "--lr", "1e-3", "--min-lr", "1e-4",
]  # fmt: skip
"""A whole three-stage run in 5 steps on the 4-layer GQA debug model."""


def _allow_children() -> None:
    """torch_dist checkpoint writes start worker processes, which a daemonic test rank may
    not do; torchrun's ranks are not daemonic."""
    import multiprocessing

    multiprocessing.current_process()._config["daemon"] = False


def _train(argv: list[str]) -> None:
    from megatron_dmc.training.arguments import parse_args

    _allow_children()
    from megatron_dmc.training.loop import train

    train(parse_args(argv))


def train_in_processes(world_size: int, argv: list[str], timeout_s: float = 240) -> None:
    run_distributed(_train, world_size, args=(argv,), timeout_s=timeout_s)


def metrics(save: Path) -> list[dict]:
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def curve(save: Path, key: str = "lm_loss") -> list[float | None]:
    return [m.get(key) for m in metrics(save)]


def _save_initial(path: str, model_name: str) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_dmc.distributed import initialize_distributed
    from megatron_dmc.model.builder import build_model
    from megatron_dmc.model.config import ModelConfig

    _allow_children()
    initialize_distributed(1, 1, seed=1234)
    model = build_model(ModelConfig.from_yaml(model_name), "vanilla")
    target = Path(path) / "release"
    target.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 0}, str(target))
    dist.barrier()
    (Path(path) / "latest_checkpointed_iteration.txt").write_text("release\n")


def save_initial_checkpoint(path: Path, model_name: str = "tiny_gqa") -> Path:
    """A plain Megatron checkpoint (no DMC state), like the HF converter writes."""
    run_distributed(_save_initial, 1, args=(str(path), model_name))
    return path
