"""Training checkpoints: Megatron-Core dist_checkpointing (torch_dist), saved atomically.

    SAVE/latest_checkpointed_iteration.txt   the newest complete iteration (written last)
    SAVE/iter_0000100/                       model + optimizer shards, common.pt (iteration,
                                             DMC progress, run args, export metadata), RNG
    SAVE/iter_0000100/dmc_cr.json            trained CR per layer and KV head
    SAVE/iter_0000200.tmp/                   a save in progress (ignored by loading)

A save writes `iter_XXXXXXX.tmp`, renames it to `iter_XXXXXXX` and only then replaces the
tracker file, so a run killed mid-save leaves the previous checkpoint loadable. Loading
reshards: a checkpoint saved at one TP/PP layout loads into any other.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_dmc.model.heads import drop_absent_heads
from megatron_dmc.model.lora import drop_absent_adapters
from megatron_dmc.schema.checkpoint import (
    COMMON_FILE,
    LATEST_FILE,
    METADATA_KEY,
    iteration_dir_name,
)
from megatron_dmc.training.damage import (
    DamagedCheckpointError,
    alternatives,
    checked_iteration_dir,
)
from megatron_dmc.training.rng import get_rng_state, set_rng_state

CHECKPOINT_VERSION = 3.0
"""Megatron-LM's checkpoint_version for mcore dist checkpoints."""

CR_FILE = "dmc_cr.json"


@dataclass
class Progress:
    """Where training stands; stored in every checkpoint."""

    iteration: int = 0
    """Optimizer steps taken, over all stages and launches."""

    consumed_samples: int = 0
    """Training sequences read so far (the data order resumes from here)."""

    stage: str | None = None
    """Current DMC stage; None for a checkpoint without DMC state (a converted model)."""

    stage_step: int = 0
    """Steps done in `stage`."""

    stage_done: bool = False
    """The stage finished (for zero_out: the decision rows were zeroed)."""

    skipped_iterations: int = 0
    """Steps whose loss or gradient was not finite, skipped under --skip-nonfinite-steps."""


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / iteration_dir_name(iteration)


def _layout() -> list[int]:
    """[PP, TP, DP] sizes of this run."""
    return [
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    ]


def _rng_object(state: Any) -> ShardedObject:
    """One RNG state per model-parallel rank; data-parallel replicas keep their own copy."""
    rank = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, tuple(_layout()), rank, replica_id=0)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPT model inside Megatron's DDP wrapper (its keys are the converter's keys)."""
    return getattr(model, "module", model)


def _state_dict(model, optimizer, progress: Progress, extra: dict[str, Any], is_loading: bool):
    model_sd = _unwrap(model).sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd, "rng_state": _rng_object(get_rng_state())}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    if not is_loading:
        state.update(
            checkpoint_version=CHECKPOINT_VERSION,
            iteration=progress.iteration,
            dmc_progress=asdict(progress),
            parallel_layout=_layout(),
            **extra,
        )
    return state


def _write_tracker(root: Path, iteration: int) -> None:
    tmp = root / f".{LATEST_FILE}.tmp"
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, root / LATEST_FILE)


def _publish(staging: Path, final: Path) -> None:
    """Rename the finished save into place. An existing `final` is one the tracker does not
    name (the train loop never saves the iteration it resumed from or saved already)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    root: str | Path,
    model: torch.nn.Module,
    optimizer: Any,
    progress: Progress,
    extra: dict[str, Any],
    layer_head_cr: list[list[float]] | None = None,
) -> Path:
    """Collective: save at `progress.iteration` under `root`; return the iteration dir.

    `extra` goes into common.pt as is (run args, export metadata under METADATA_KEY).
    """
    root = Path(root)
    final = iteration_dir(root, progress.iteration)
    staging = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    state = _state_dict(model, optimizer, progress, extra, is_loading=False)
    dist_checkpointing.save(state, str(staging))
    dist.barrier()
    if dist.get_rank() == 0:
        if layer_head_cr is not None:
            (staging / CR_FILE).write_text(json.dumps({"layer_head_cr": layer_head_cr}))
        _publish(staging, final)
        _write_tracker(root, progress.iteration)
    dist.barrier()
    return final


def has_checkpoint(root: str | Path | None) -> bool:
    return root is not None and (Path(root) / LATEST_FILE).is_file()


def read_common(path: str | Path, step: int | None = None) -> dict[str, Any]:
    """common.pt of the newest checkpoint under `path`, or of iteration `step` (no model
    needed); a damaged checkpoint raises DamagedCheckpointError."""
    directory = checked_iteration_dir(path, step)
    with _reading(directory, directory / COMMON_FILE):
        return dist_checkpointing.load_common_state_dict(str(directory))


@contextmanager
def _reading(directory: Path, what: Path) -> Iterator[None]:
    """Turn a reader's failure on a checkpoint that looked whole into a refusal naming it."""
    try:
        yield
    except (EOFError, OSError, RuntimeError, pickle.UnpicklingError) as error:
        raise DamagedCheckpointError(
            f"{what}: unreadable ({type(error).__name__}: {error}); {alternatives(directory.parent)}"
        ) from error


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: Any,
    load_optim: bool = True,
    load_rng: bool = True,
    step: int | None = None,
) -> tuple[Progress, dict[str, Any]]:
    """Collective: load weights (and optimizer, RNG when present and asked) at this layout.

    A checkpoint without DMC progress (a converted vanilla model) loads weights only and
    starts at iteration 0. The RNG state is loaded only at the layout it was saved from
    (the train loop re-derives it every step anyway). `step` picks a saved iteration other
    than the newest. Returns the progress and common.pt.
    """
    directory = checked_iteration_dir(path, step)
    common = read_common(directory)
    ours = "dmc_progress" in common
    optimizer = optimizer if ours and load_optim else None
    request = _state_dict(model, optimizer, Progress(), {}, is_loading=True)
    if not (ours and load_rng and common.get("parallel_layout") == _layout()):
        request.pop("rng_state")
    absent = drop_absent_adapters(request["model"], directory)
    absent += drop_absent_heads(request["model"], directory)
    with _reading(directory, directory):
        loaded = dist_checkpointing.load(request, str(directory))
    own = _unwrap(model).state_dict(keep_vars=True)
    loaded["model"].update({key: own[key] for key in absent})
    _unwrap(model).load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if "rng_state" in loaded:
        set_rng_state(loaded["rng_state"])
    progress = Progress(**common["dmc_progress"]) if ours else Progress()
    return progress, common


def export_metadata(common: dict[str, Any]) -> dict[str, Any] | None:
    return common.get(METADATA_KEY)
