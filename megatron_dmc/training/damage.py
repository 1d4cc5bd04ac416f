"""Is a saved checkpoint whole? Name the damaged file and what can be loaded instead.

A torch_dist iteration directory holds common.pt, metadata.json, the index `.metadata`
and the shards (`__R_I.distcp`) at the byte ranges the index names; a shard shorter than
its ranges is truncated. Checked before anything is loaded, so that a damaged checkpoint
is refused with a message rather than a reader's traceback.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader

from megatron_dmc.schema.checkpoint import LATEST_FILE, RELEASE, iteration_dir_name

_ITERATION = re.compile(rf"iter_(\d+)|{RELEASE}")

REQUIRED = ("common.pt", "metadata.json", ".metadata")
"""Files every torch_dist checkpoint directory has besides its shards."""


class DamagedCheckpointError(ValueError):
    """A checkpoint file is missing, truncated or unreadable."""


def iteration_problem(directory: Path) -> str | None:
    """'FILE: what is wrong' for the first damaged file of `directory`; None when whole."""
    if not directory.is_dir():
        return f"{directory}: no such checkpoint directory"
    for name in REQUIRED:
        if not (directory / name).is_file():
            return f"{directory / name}: missing"
    try:
        storage = FileSystemReader(str(directory)).read_metadata().storage_data
    except Exception as error:  # any reader failure means the index is damaged
        return f"{directory / '.metadata'}: unreadable ({type(error).__name__}: {error})"
    needed: dict[str, int] = defaultdict(int)
    for info in storage.values():
        needed[info.relative_path] = max(needed[info.relative_path], info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = directory / name
        if not shard.is_file():
            return f"{shard}: missing"
        if shard.stat().st_size < size:
            return f"{shard}: truncated ({shard.stat().st_size} bytes, its index needs {size})"
    return None


def complete_iterations(root: Path) -> list[int]:
    """Saved iterations under `root` whose directories are whole, oldest first."""
    found = []
    for path in root.glob("iter_*"):
        match = _ITERATION.fullmatch(path.name)
        if match and match.group(1) and iteration_problem(path) is None:
            found.append(int(match.group(1)))
    return sorted(found)


def alternatives(root: Path) -> str:
    """What the user can load instead, for the end of an error message."""
    whole = complete_iterations(root)
    if not whole:
        return f"no complete iteration under {root}"
    listed = ", ".join(map(str, whole))
    return f"complete iterations under {root}: {listed}; start from one with --ckpt-step N"


def _tracked(root: Path) -> str:
    tracker = root / LATEST_FILE
    text = tracker.read_text(errors="replace").strip()
    if text != RELEASE and not text.isdigit():
        raise DamagedCheckpointError(
            f"{tracker}: expected an iteration number or '{RELEASE}', found {text[:40]!r}; "
            f"{alternatives(root)}"
        )
    return text


def checked_iteration_dir(path: str | Path, step: int | None = None) -> Path:
    """The directory to load from `path` (a run root with LATEST_FILE, or an iteration
    directory): iteration `step` when given, else the tracked one; raises
    DamagedCheckpointError naming the damaged file and listing the whole iterations."""
    root = Path(path)
    if step is not None:
        directory = root / iteration_dir_name(step)
    elif (root / LATEST_FILE).is_file():
        directory = root / iteration_dir_name(_tracked(root))
    elif root.is_dir() and (_ITERATION.fullmatch(root.name) or (root / REQUIRED[0]).is_file()):
        directory, root = root, root.parent
    else:
        raise ValueError(
            f"{root} is not a distributed checkpoint (no {LATEST_FILE}, no {REQUIRED[0]}); "
            f"{alternatives(root) if root.is_dir() else 'it does not exist'}"
        )
    problem = iteration_problem(directory)
    if problem is not None:
        raise DamagedCheckpointError(f"{problem}; {alternatives(root)}")
    return directory
