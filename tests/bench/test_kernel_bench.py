"""`python -m megatron_dmc.bench.kernel` runs and reports the three timings per layer."""

from __future__ import annotations

import pytest

from megatron_dmc.bench import kernel
from megatron_dmc.inference import paged_cpu


def test_kernel_bench_reports_each_timing(capsys):
    if paged_cpu.extension() is None:
        pytest.skip("compiled kernel not built here")
    kernel.main(["--batch", "2", "--context", "40", "--layers", "2", "--reps", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["kernel", "blocked"]
    assert lines[2].startswith("streaming read") and "GB/s" in lines[2]
    assert lines[-1].startswith("kernel / streaming read:")


def test_kernel_bench_refuses_bad_sizes():
    with pytest.raises(SystemExit, match="must be >= 1"):
        kernel.main(["--context", "0"])
