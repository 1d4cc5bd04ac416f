"""The main job end to end: import a Llama, retrofit DMC, export, evaluate, report.

`python -m megatron_dmc.demo` is its command line; see docs/demo.md.
"""

from megatron_dmc.pipeline.job import Job
from megatron_dmc.pipeline.preset import Preset, load_preset

__all__ = ["Job", "Preset", "load_preset"]
