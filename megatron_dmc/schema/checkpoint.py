"""On-disk layout of converted Megatron checkpoints, their metadata, and atomic writes.

SAVE/latest_checkpointed_iteration.txt   "release" (or an iteration number)
SAVE/release/ or SAVE/iter_0000100/      torch_dist checkpoint (Megatron-LM layout);
                                         COMMON_FILE holds METADATA_KEY
SAVE/hf_assets/                          tokenizer files of the source, for export
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from megatron_dmc.schema.llama import LlamaShape

LATEST_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
ASSETS_DIR = "hf_assets"
METADATA_KEY = "megatron_dmc"
COMMON_FILE = "common.pt"
"""The non-sharded part of a torch_dist checkpoint (Megatron-Core's COMMON_STATE_FNAME)."""
FORMAT_VERSION = 2
"""2: the DMC target CR is stored as `target_cr` (1 called it `compression_ratio`)."""


def checkpoint_metadata(
    shape: LlamaShape,
    dmc: dict[str, Any] | None = None,
    hf_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What export needs besides the tensors; store it under METADATA_KEY in common.pt.

    `dmc` (None for a vanilla model) holds the DMC export fields: window_size, init_val,
    target_cr and optionally layer_head_cr ([layers][kv_heads] trained ratios).
    """
    return {
        "format_version": FORMAT_VERSION,
        "llama": shape.to_dict(),
        "dmc": dmc,
        "hf_config": hf_config or {},
    }


def iteration_dir_name(iteration: int | str) -> str:
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


def resolve_iteration_dir(path: str | Path) -> Path:
    """A checkpoint root (with LATEST_FILE) or an iteration directory -> the iteration dir."""
    root = Path(path)
    latest = root / LATEST_FILE
    if latest.is_file():
        return root / iteration_dir_name(latest.read_text().strip())
    if root.is_dir():
        return root
    raise ValueError(f"{root} is neither a checkpoint directory nor contains {LATEST_FILE}")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The METADATA_KEY dict of a checkpoint root or iteration directory (no Megatron needed)."""
    common_file = resolve_iteration_dir(path) / COMMON_FILE
    if not common_file.is_file():
        raise ValueError(f"{path} has no {COMMON_FILE}: not a torch_dist checkpoint")
    metadata = torch.load(common_file, map_location="cpu").get(METADATA_KEY)
    if not metadata or "llama" not in metadata:
        raise ValueError(
            f"{path} has no '{METADATA_KEY}' metadata (was it written by megatron_dmc?); "
            "pass the model shape explicitly"
        )
    return upgraded_metadata(metadata)


def upgraded_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """METADATA_KEY contents of any FORMAT_VERSION, in the current field names."""
    dmc = metadata.get("dmc")
    if metadata.get("format_version", FORMAT_VERSION) < 2 and dmc and "compression_ratio" in dmc:
        dmc = {k: v for k, v in dmc.items() if k != "compression_ratio"}
        dmc["target_cr"] = metadata["dmc"]["compression_ratio"]
        metadata = {**metadata, "dmc": dmc, "format_version": FORMAT_VERSION}
    return metadata


def check_new_directory(path: str | Path) -> Path:
    """Refuse to overwrite: the target must not exist or be an empty directory."""
    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{target} exists and is not empty; remove it or choose a new path")
    return target


def staging_path(final: Path) -> Path:
    return final.parent / f".{final.name}.partial"


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a staging directory next to `final`; rename it to `final` only on success."""
    target = check_new_directory(final)
    staging = staging_path(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, target)


def publish(staging: Path, final: Path) -> None:
    if final.exists():
        final.rmdir()
    os.replace(staging, final)
