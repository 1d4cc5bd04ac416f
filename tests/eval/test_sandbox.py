"""The sandbox fails a program that hangs, eats memory, forks, opens sockets or writes
outside its directory, and passes one that runs to its end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megatron_dmc.eval.sandbox import SandboxLimits, run_program, sandbox_mode

FAST = SandboxLimits(timeout_s=5.0, cpu_s=1, memory_mb=256)


def test_correct_program_passes():
    result = run_program("def f(x):\n    return x + 1\n\nassert f(1) == 2\n", FAST)
    assert result.passed and result.status == "passed" and result.returncode == 0


def test_wrong_program_fails():
    result = run_program("assert 1 + 1 == 3\n", FAST)
    assert not result.passed and result.status == "failed"
    assert "AssertionError" in result.detail


def test_infinite_loop_is_stopped_by_cpu_limit():
    result = run_program("while True:\n    pass\n", FAST)
    assert not result.passed and result.status == "timeout"
    assert result.seconds < FAST.timeout_s + 2


def test_sleeping_program_is_killed_at_the_wall_clock_timeout():
    limits = SandboxLimits(timeout_s=1.0, cpu_s=5, memory_mb=256)
    result = run_program("import time\ntime.sleep(60)\n", limits)
    assert not result.passed and result.status == "timeout"
    assert result.seconds < 5


def test_memory_bomb_fails():
    bomb = "x = []\nwhile True:\n    x.append(' ' * 10**7)\n"
    result = run_program(bomb, FAST)
    assert not result.passed
    assert "MemoryError" in result.detail or result.status in ("killed (SIGKILL)", "timeout")


@pytest.mark.parametrize("hook", [True, False], ids=["audit-hook", "os-limits-only"])
def test_fork_bomb_fails(hook):
    if not hook and os.geteuid() == 0 and sandbox_mode(FAST)["uid"] is None:
        pytest.skip("root without an interpreter for nobody: RLIMIT_NPROC does not apply")
    limits = SandboxLimits(timeout_s=5.0, cpu_s=1, memory_mb=256, audit_hook=hook)
    result = run_program("import os\nwhile True:\n    os.fork()\n", limits)
    assert not result.passed
    assert result.status == ("blocked" if hook else "failed")
    if not hook:  # RLIMIT_NPROC refuses the first fork
        assert "BlockingIOError" in result.detail or "Resource temporarily" in result.detail


def test_exit_zero_midway_does_not_pass():
    result = run_program("import sys\nsys.exit(0)\nassert False\n", FAST)
    assert not result.passed and result.returncode == 0


def test_writes_stay_inside_the_work_directory(tmp_path):
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o777)
    result = run_program(f"open({str(target)!r}, 'w').write('x')\n", FAST)
    assert not result.passed and not target.exists()
    inside = "open('a.txt', 'w').write('x')\nassert open('a.txt').read() == 'x'\n"
    assert run_program(inside, FAST).passed


def test_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("SECRET_FOR_SANDBOX_TEST", "1")
    program = "import os\nassert 'SECRET_FOR_SANDBOX_TEST' not in os.environ\n"
    assert run_program(program, FAST).passed


def test_no_network():
    program = "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n"
    assert not run_program(program, FAST).passed
    if sandbox_mode(FAST)["unshare"]:  # a namespace without interfaces: even loopback is down
        limits = SandboxLimits(timeout_s=5.0, cpu_s=1, memory_mb=256, audit_hook=False)
        result = run_program(program, limits)
        assert not result.passed and "Network is unreachable" in result.detail


def test_temporary_directory_is_removed():
    program = "import os\nprint(os.getcwd())\n"
    before = set(Path("/tmp").glob("dmc_sandbox_*"))
    assert run_program(program, FAST).passed
    assert set(Path("/tmp").glob("dmc_sandbox_*")) <= before


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="sandbox limits"):
        SandboxLimits(timeout_s=0)
