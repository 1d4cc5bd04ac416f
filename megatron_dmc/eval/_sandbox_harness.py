"""Runs inside the sandbox (sandbox.py): drop root, forbid new processes, install the
audit hook, run `program.py`, then print the token read from stdin.

Usage: python -I -B _sandbox_harness.py WORKDIR UID HOOK (UID -1: keep the current user;
HOOK 0: no audit hook, to test the OS layers alone).
Standard library only: it runs under whichever interpreter the sandbox picked.
"""

import os
import resource
import signal
import sys

CPU_EXIT = 124
"""Exit status after the soft CPU-time limit (SIGXCPU)."""

BLOCKED_EVENTS = {
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
    "os.kill", "os.killpg", "subprocess.Popen", "pty.spawn", "resource.setrlimit",
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
    "socket.gethostbyname", "ctypes.dlopen", "ctypes.dlsym", "os.chroot", "os.setuid",
}  # fmt: skip
PATH_EVENTS = {
    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
    "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move",
}  # fmt: skip
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class SandboxBlocked(PermissionError):
    """Raised by the audit hook for an operation the sandbox forbids."""


def _inside(path, root: str) -> bool:
    if isinstance(path, int):
        return True
    path = os.fsdecode(os.fspath(path))
    real = os.path.realpath(os.path.join(os.getcwd(), path))
    return real == root or real.startswith(root + os.sep)


def _writes(mode, flags) -> bool:
    if isinstance(flags, int) and flags & WRITE_FLAGS:
        return True
    return isinstance(mode, str) and any(c in mode for c in "wax+")


def make_hook(root: str):
    def hook(event: str, args: tuple) -> None:
        if event in BLOCKED_EVENTS:
            raise SandboxBlocked(f"sandbox: {event} is not allowed")
        if event == "open" and _writes(args[1], args[2]) and not _inside(args[0], root):
            raise SandboxBlocked(f"sandbox: writing {args[0]!r} outside the work directory")
        if event in PATH_EVENTS:
            paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
            if not all(_inside(p, root) for p in paths):
                raise SandboxBlocked(f"sandbox: {event} outside the work directory")

    return hook


def _out_of_cpu(signum, frame) -> None:
    sys.stderr.write("sandbox: CPU time limit reached\n")
    sys.stderr.flush()
    os._exit(CPU_EXIT)


def main() -> None:
    workdir, uid, hook = os.path.realpath(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    token = sys.stdin.read().strip()
    os.chdir(workdir)
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
    signal.signal(signal.SIGXCPU, _out_of_cpu)
    with open("program.py") as handle:
        code = compile(handle.read(), "program.py", "exec")
    if hook:
        sys.addaudithook(make_hook(workdir))
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    sys.stdout.write("\n" + token + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
