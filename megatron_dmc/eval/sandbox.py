"""Run untrusted Python (generated code) in a separate, limited process.

Each program runs in its own child process, layered so that one that hangs, crashes,
forks, opens sockets or writes outside its directory fails alone:

- a fresh temporary directory as its working directory (removed afterwards), stdout and
  stderr into files there, its environment stripped to PATH, LANG and HOME;
- a network namespace with no interfaces and a PID namespace that dies with the child
  (`unshare -n --pid --kill-child`; `unshare -rn ...` for a non-root user) where `unshare`
  works; elsewhere only the audit hook below blocks sockets;
- RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE and RLIMIT_NPROC (no new processes; when
  started as root the child first drops to `nobody` where an interpreter it may read
  exists, since Linux never applies RLIMIT_NPROC to uid 0), plus a wall-clock timeout
  after which the whole process group is killed;
- a `sys.addaudithook` hook (it cannot be removed) that refuses fork/exec/spawn/system,
  sockets, ctypes, and file writes, deletes, renames and mode changes outside the
  directory;
- the program passes only if it exits 0 after running to its end: the harness prints a
  token read from stdin once the program has finished, so `exit(0)` midway fails.

The hook guards against accidents of generated code, not against code written to escape
it (frame introspection can reach the harness); the OS layers are the backstop.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

NOBODY = 65534
CPU_EXIT = 124
"""The harness's exit status once the program used up its CPU time (SIGXCPU)."""
_HARNESS = Path(__file__).with_name("_sandbox_harness.py")


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run."""

    timeout_s: float = 10.0
    """Wall-clock seconds before the process group is killed."""
    cpu_s: int = 5
    """RLIMIT_CPU: CPU seconds (SIGXCPU past it)."""
    memory_mb: int = 1024
    """RLIMIT_AS: address space in MiB (allocations past it raise MemoryError)."""
    file_mb: int = 16
    """RLIMIT_FSIZE: the largest file it may write, stdout/stderr included, in MiB."""
    namespaces: bool = True
    """Use `unshare` for a network and PID namespace where it works."""
    drop_root: bool = True
    """Started as root: run the program as `nobody` where a readable interpreter exists."""
    audit_hook: bool = True
    """Install the audit hook (False only to test the OS layers alone)."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.cpu_s < 1 or self.memory_mb < 64 or self.file_mb < 1:
            raise ValueError(
                "sandbox limits: timeout_s > 0, cpu_s >= 1, memory_mb >= 64 and file_mb >= 1; "
                f"got {self}"
            )


@dataclass
class SandboxResult:
    """What happened to one program."""

    passed: bool
    status: str
    """passed, failed, timeout (wall clock or CPU time), killed (by a signal) or blocked
    (the audit hook refused an operation)."""
    returncode: int | None
    seconds: float
    detail: str = ""
    """The last lines of stderr (the exception, when it raised)."""

    def as_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=4)
def _unshare_prefix(as_root: bool) -> tuple[str, ...]:
    """`unshare` flags that work on this machine (probed once), or () where none do."""
    if shutil.which("unshare") is None:
        return ()
    flags = ("-n",) if as_root else ("-r", "-n")
    for extra in (("--pid", "--kill-child"), ()):
        prefix = ("unshare", *flags, *extra)
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        if probe.returncode == 0:
            return prefix
    return ()


def _runs_as(python: str, uid: int) -> bool:
    """Whether `python` starts and imports the standard library as user `uid`."""
    argv = [python, "-I", "-B", "-c", "import json, math, typing, collections"]
    try:
        probe = subprocess.run(
            argv, capture_output=True, user=uid, group=uid, extra_groups=[], cwd="/", timeout=30
        )
    except OSError:
        return False
    return probe.returncode == 0


@functools.lru_cache(maxsize=4)
def _interpreter(drop_root: bool) -> tuple[str, int | None]:
    """(interpreter, uid to run as): as root, the first interpreter `nobody` can run."""
    if os.geteuid() != 0 or not drop_root:
        return sys.executable, None
    candidates = [sys.executable, getattr(sys, "_base_executable", ""), "/usr/bin/python3"]
    for path in dict.fromkeys(p for p in candidates if p and os.path.exists(p)):
        if _runs_as(path, NOBODY):
            return path, NOBODY
    return sys.executable, None


def sandbox_mode(limits: SandboxLimits | None = None) -> dict:
    """How programs are isolated here: interpreter, user, namespaces (for the results)."""
    limits = limits or SandboxLimits()
    python, uid = _interpreter(limits.drop_root)
    prefix = _unshare_prefix(os.geteuid() == 0) if limits.namespaces else ()
    return {"python": python, "uid": uid, "unshare": " ".join(prefix) or None}


def _child_limits(limits: SandboxLimits):
    import resource

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        memory = limits.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        size = limits.file_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _tail(path: Path, chars: int = 2000) -> str:
    if not path.is_file():
        return ""
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - chars))
        return handle.read().decode("utf-8", "replace")


def _classify(rc: int | None, timed_out: bool, out: str, err: str, token: str) -> tuple[bool, str]:
    if timed_out:
        return False, "timeout"
    if rc == CPU_EXIT:
        return False, "timeout"
    if rc is not None and rc < 0:
        return False, f"killed ({signal.Signals(-rc).name})"
    if rc == 0 and out.rstrip().endswith(token):
        return True, "passed"
    if "SandboxBlocked" in err:
        return False, "blocked"
    return False, "failed"


def run_program(source: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `source` as a Python program in a fresh sandbox; passed = it ran to its end."""
    limits = limits or SandboxLimits()
    python, uid = _interpreter(limits.drop_root)
    prefix = _unshare_prefix(os.geteuid() == 0) if limits.namespaces else ()
    workdir = Path(tempfile.mkdtemp(prefix="dmc_sandbox_"))
    token = secrets.token_hex(16)
    try:
        (workdir / "program.py").write_text(source)
        if uid is not None:
            for path in (workdir, workdir / "program.py"):
                os.chown(path, uid, uid)
        argv = [*prefix, python, "-I", "-B", str(_HARNESS), str(workdir), str(uid or -1)]
        argv.append("1" if limits.audit_hook else "0")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir)}
        with open(workdir / ".stdout", "wb") as out, open(workdir / ".stderr", "wb") as err:
            start = time.monotonic()
            proc = subprocess.Popen(
                argv, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                preexec_fn=_child_limits(limits), start_new_session=True,
            )  # fmt: skip
            timed_out = False
            try:
                proc.communicate(token.encode(), timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc)
            seconds = time.monotonic() - start
        stdout, stderr = _tail(workdir / ".stdout"), _tail(workdir / ".stderr")
        passed, status = _classify(proc.returncode, timed_out, stdout, stderr, token)
        return SandboxResult(passed, status, proc.returncode, round(seconds, 3), stderr[-500:])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill whatever the program left in its process group, then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
