"""How every command line of the project ends on an error.

A refusal (bad input: `ValueError`, a missing or unreadable path) prints one line,
`error: ...`, on stderr and exits 2; its message says what to do. A run stopped by
non-finite numbers (`FloatingPointError`) prints its one line and exits 1. No traceback
unless `--debug` is on the command line (anywhere) or MEGATRON_DMC_DEBUG=1; anything else
is a bug and always shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

REFUSED = 2
"""Exit status of a refusal (argparse's own, for bad flags)."""

STOPPED = 1
"""Exit status of a run stopped by NaN/inf."""

DEBUG_FLAG = "--debug"
DEBUG_ENV = "MEGATRON_DMC_DEBUG"

REFUSALS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
"""What counts as bad input rather than a bug."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too (the usage itself is in --help), with
    --debug listed (`run` acts on it wherever it appears)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            DEBUG_FLAG,
            action="store_true",
            help=f"on an error, print the traceback too (or set {DEBUG_ENV}=1)",
        )

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(REFUSED, f"error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def debugging(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _report(error: BaseException) -> None:
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    where = f"rank {rank}: " if rank is not None else ""
    print(f"error: {where}{one_line(error)}", file=sys.stderr, flush=True)


def run(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv without --debug)`; map refusals to 2 and non-finite stops to 1.

    Returns `main`'s own status when it returns an int, else 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debugging(argv)
    try:
        status = main([a for a in argv if a != DEBUG_FLAG])
    except REFUSALS as error:
        if debug:
            raise
        _report(error)
        return REFUSED
    except FloatingPointError as error:
        if debug:
            raise
        _report(error)
        return STOPPED
    return status if isinstance(status, int) else 0
