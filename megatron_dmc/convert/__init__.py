"""Checkpoint converters: HF Llama <-> Megatron-Core (any TP/PP), DMC-aware HF export,
import of the released NVIDIA DMC checkpoints. See docs/convert.md."""

from megatron_dmc.convert._model import (
    build_gpt_model,
    model_config_from_shape,
    shape_from_model_config,
)
from megatron_dmc.convert.commands import (
    compare_hf_dirs,
    export_hf,
    export_release_hf,
    import_hf,
    import_release,
    reshard,
    roundtrip,
)
from megatron_dmc.convert.hf_io import HFCheckpoint
from megatron_dmc.convert.layout import METADATA_KEY, checkpoint_metadata
from megatron_dmc.convert.llama_config import LlamaShape
from megatron_dmc.convert.megatron_io import (
    MegatronCheckpoint,
    load_into_model,
    read_metadata,
    save_model,
)
from megatron_dmc.convert.release import ReleaseCheckpoint

__all__ = [
    "METADATA_KEY",
    "HFCheckpoint",
    "LlamaShape",
    "MegatronCheckpoint",
    "ReleaseCheckpoint",
    "build_gpt_model",
    "checkpoint_metadata",
    "compare_hf_dirs",
    "export_hf",
    "export_release_hf",
    "import_hf",
    "import_release",
    "load_into_model",
    "model_config_from_shape",
    "read_metadata",
    "reshard",
    "roundtrip",
    "save_model",
    "shape_from_model_config",
]
