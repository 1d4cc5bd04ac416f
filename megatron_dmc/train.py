"""DMC retrofit training: `torchrun [...] -m megatron_dmc.train --model llama2_7b ...`.

See docs/training.md; the library in megatron_dmc/training does the work.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from megatron_dmc.training.arguments import parse_args
from megatron_dmc.training.loop import train


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        train(cfg)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        from megatron_dmc.distributed import destroy_distributed

        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
