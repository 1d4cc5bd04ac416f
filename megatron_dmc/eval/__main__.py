import sys

from megatron_dmc.cli_errors import run
from megatron_dmc.eval.cli import main

sys.exit(run(main))
