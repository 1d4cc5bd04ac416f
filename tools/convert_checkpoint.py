"""Convert checkpoints: HF Llama <-> Megatron-Core (any TP/PP), NVIDIA DMC release import.

    python tools/convert_checkpoint.py import-hf --hf-dir HF --save MEG --tp 2 --pp 1
    python tools/convert_checkpoint.py export-hf --load MEG --hf-dir OUT [--dmc]
    python tools/convert_checkpoint.py roundtrip --hf-dir HF --tp 2
    python tools/convert_checkpoint.py reshard --load MEG --save MEG_TP1 --tp 1
    python tools/convert_checkpoint.py import-release --load RELEASE --hf-dir OUT --vocab-size 32000

TP/PP > 1 spawns TP x PP local gloo processes itself (no torchrun). See docs/convert.md.
"""

import sys

from megatron_dmc.cli_errors import run
from megatron_dmc.convert.cli import main

if __name__ == "__main__":
    sys.exit(run(main))
