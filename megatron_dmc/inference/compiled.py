"""The compiled CPU extension (csrc/): where it is built, how, and loading it.

`python -m megatron_dmc.inference.paged_cpu --build` (scripts/setup.sh runs it) compiles
the sources once into the asset cache; at run time `load()` imports the module from there
without a compiler, or returns None where it was not built. It holds the paged decode
attention (`paged_decode`, used by paged_cpu.py) and the fused cache write
(`cache_append`, used by cache_append.py).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

SOURCES = [
    Path(__file__).with_name("csrc") / name for name in ("paged_decode.cpp", "cache_append.cpp")
]
ARCH_VARIABLE = "MEGATRON_DMC_KERNEL_ARCH"
"""-march of the build (default `native`: the CPU it is built on, which is also the one it
runs on, since the build lives in the user's cache; set e.g. `x86-64-v3` for a cache shared
by machines of different CPUs)."""

MODULE = "dmc_paged_decode_cpu"


def flags() -> list[str]:
    return ["-O3", f"-march={os.environ.get(ARCH_VARIABLE, 'native')}", "-fopenmp"]


def build_dir() -> Path:
    """One folder per (sources, flags, torch, python, CPU) so a stale or foreign build is
    never loaded (-march=native code runs only on the CPU it was built for)."""
    from megatron_dmc.assets.cache import cache_root

    key = b"".join(source.read_bytes() for source in SOURCES)
    key += " ".join(flags()).encode() + torch.__version__.encode() + _cpu_flags().encode()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-{hashlib.sha1(key).hexdigest()[:12]}"
    return cache_root() / "ext" / f"paged_decode-{tag}"


def _cpu_flags() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line for line in lines if line.startswith("flags")), platform.processor())


def build(verbose: bool = False) -> ModuleType:
    """Compile the sources into build_dir() (needs a C++ compiler and ninja)."""
    from torch.utils.cpp_extension import load as compile_and_load

    target = build_dir()
    target.mkdir(parents=True, exist_ok=True)
    return compile_and_load(MODULE, [str(source) for source in SOURCES], extra_cflags=flags(),
                            extra_ldflags=["-fopenmp"], build_directory=str(target),
                            verbose=verbose)  # fmt: skip


@cache
def load() -> ModuleType | None:
    """The built module, or None when it was not built (no warning; callers say so)."""
    built = sorted(build_dir().glob(f"{MODULE}*.so"))
    if not built:
        return None
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(built[0]))
    spec = importlib.util.spec_from_file_location(MODULE, built[0], loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
