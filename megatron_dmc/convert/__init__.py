"""Checkpoint converters: HF Llama <-> Megatron-Core (any TP/PP), DMC-aware HF export,
import of the released NVIDIA DMC checkpoints. See docs/convert.md.

Attributes load lazily, so `megatron_dmc.convert.llama_config` and friends import without
pulling in Megatron-Core.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "build_gpt_model": "_model",
    "model_config_from_shape": "_model",
    "shape_from_model_config": "_model",
    "compare_hf_dirs": "commands",
    "export_hf": "commands",
    "export_release_hf": "commands",
    "import_hf": "commands",
    "import_release": "commands",
    "reshard": "commands",
    "roundtrip": "commands",
    "HFCheckpoint": "hf_io",
    "METADATA_KEY": "layout",
    "checkpoint_metadata": "layout",
    "LlamaShape": "llama_config",
    "MegatronCheckpoint": "megatron_io",
    "load_into_model": "megatron_io",
    "read_metadata": "megatron_io",
    "save_model": "megatron_io",
    "ReleaseCheckpoint": "release",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


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
