"""DMC retrofit training: `torchrun [...] -m megatron_dmc.train --model llama2_7b ...`.

See docs/training.md; the library in megatron_dmc/training does the work.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from megatron_dmc.cli_errors import run
from megatron_dmc.training.arguments import parse_args
from megatron_dmc.training.loop import train


def _train(argv: list[str]) -> int:
    try:
        train(parse_args(argv))
    finally:
        from megatron_dmc.distributed import destroy_distributed

        destroy_distributed()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 2 refused (one line on stderr), 1 stopped by NaN/inf."""
    return run(_train, argv)


if __name__ == "__main__":
    sys.exit(main())
