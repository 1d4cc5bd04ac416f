"""A pytest plugin: per test, the CPU seconds of pytest and every process below it, and wall
seconds, appended to a TSV as each test ends (so a run cut short still leaves its rows).

Wall time is noisy on shared cores; CPU time is not. Ranks that a fork server starts are
its children, not pytest's: their time is read from the server's reaped-children counters,
so it is counted too.

    PYTHONPATH=$PWD:$PWD/tools CPUTIME_OUT=/tmp/cputime.tsv \
        python -m pytest -q -m slow -p pytest_cputime
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import psutil
import pytest

OUT_ENV = "CPUTIME_OUT"
"""Where the rows go (default cputime.tsv in the current directory)."""


def tree_cpu_seconds() -> float:
    """User + system seconds of this process, its live descendants and the reaped children
    of each."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    cpu, wall = tree_cpu_seconds(), time.perf_counter()
    yield
    row = f"{tree_cpu_seconds() - cpu:.2f}\t{time.perf_counter() - wall:.2f}\t{item.nodeid}\n"
    with open(os.environ.get(OUT_ENV, "cputime.tsv"), "a") as out:
        out.write(row)
