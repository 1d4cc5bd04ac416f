"""transformers integration: the DMC Llama (`llama_dmc`), its compressed cache, and export help.

`import megatron_dmc.hf` registers the classes with AutoConfig / AutoModel /
AutoModelForCausalLM. An exported directory carries copies of the two code files and an
`auto_map`, so it also loads with `trust_remote_code=True` where megatron_dmc is absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from megatron_dmc.hf.configuration_llama_dmc import LlamaDMCConfig
from megatron_dmc.hf.modeling_llama_dmc import (
    DMCCache,
    DMCLlamaForCausalLM,
    DMCLlamaModel,
)

CODE_FILES = ("configuration_llama_dmc.py", "modeling_llama_dmc.py")
"""Files to copy next to an exported checkpoint, in megatron_dmc/hf/."""

AUTO_MAP = {
    "AutoConfig": "configuration_llama_dmc.LlamaDMCConfig",
    "AutoModel": "modeling_llama_dmc.DMCLlamaModel",
    "AutoModelForCausalLM": "modeling_llama_dmc.DMCLlamaForCausalLM",
}
"""The `auto_map` entry of config.json that points transformers at the copied code."""

AutoConfig.register(LlamaDMCConfig.model_type, LlamaDMCConfig, exist_ok=True)
AutoModel.register(LlamaDMCConfig, DMCLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(LlamaDMCConfig, DMCLlamaForCausalLM, exist_ok=True)


def code_files() -> list[Path]:
    """Absolute paths of the code files an exported DMC directory must carry."""
    return [Path(__file__).parent / name for name in CODE_FILES]


def add_remote_code(directory: str | Path) -> None:
    """Copy the code files into a saved DMC checkpoint and point its config.json at them."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path} not found: save the DMC model or config there first")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != LlamaDMCConfig.model_type:
        raise ValueError(
            f"{config_path} has model_type {config.get('model_type')!r}; a DMC export needs "
            f"{LlamaDMCConfig.model_type!r} (save a LlamaDMCConfig / DMCLlamaForCausalLM)"
        )
    for path in code_files():
        shutil.copyfile(path, directory / path.name)
    config["auto_map"] = dict(AUTO_MAP)
    config["architectures"] = [DMCLlamaForCausalLM.__name__]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_pretrained_with_code(
    model_or_dir: PreTrainedModel | str | Path, out_dir: str | Path, **save_kwargs
) -> Path:
    """Save a DMC model (or copy a saved directory) to out_dir with its code and auto_map."""
    out_dir = Path(out_dir)
    if isinstance(model_or_dir, PreTrainedModel):
        model_or_dir.save_pretrained(out_dir, **save_kwargs)
    elif Path(model_or_dir).resolve() != out_dir.resolve():
        shutil.copytree(model_or_dir, out_dir, dirs_exist_ok=True)
    add_remote_code(out_dir)
    return out_dir


__all__ = [
    "AUTO_MAP",
    "CODE_FILES",
    "DMCCache",
    "DMCLlamaForCausalLM",
    "DMCLlamaModel",
    "LlamaDMCConfig",
    "add_remote_code",
    "code_files",
    "save_pretrained_with_code",
]
