"""The DMC side of an HF export: config fields and the modeling code shipped alongside.

Every config.json field is a metadata field with the dmc_ prefix (dmc_window_size,
dmc_init_val, dmc_target_cr, dmc_decision_source, dmc_merge_delay, dmc_kv_method), as on
the command line (--dmc-window-size ...) and in DMCConfig (window_size, init_val, ...);
dmc_decision_threshold (0 as trained) is set after training by `eval calibrate`;
the transformers classes live in megatron_dmc/hf/ and are copied into the export so that
`from_pretrained(dir, trust_remote_code=True)` works offline.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

DMC_MODEL_TYPE = "llama_dmc"
DMC_ARCHITECTURE = "DMCLlamaForCausalLM"
CONFIG_MODULE = "configuration_llama_dmc"
MODELING_MODULE = "modeling_llama_dmc"
CONFIG_CLASS = "LlamaDMCConfig"
HF_PACKAGE_DIR = Path(__file__).resolve().parent.parent / "hf"

DMC_DEFAULTS: dict[str, Any] = {
    "window_size": 12,
    "init_val": 5.0,
    "target_cr": None,
    "layer_head_cr": None,
    "decision_source": "channel",
    "merge_delay": 0,
    "kv_method": "dmc",
    "decision_threshold": 0.0,
}
"""Metadata fields (checkpoint_metadata(dmc=...)) and their release defaults."""


def dmc_fields(dmc: dict[str, Any] | None) -> dict[str, Any]:
    """Complete a metadata `dmc` dict with defaults; refuse unknown fields."""
    given = dict(dmc or {})
    if unknown := sorted(set(given) - set(DMC_DEFAULTS)):
        raise ValueError(f"unknown DMC metadata fields {unknown}; known: {sorted(DMC_DEFAULTS)}")
    return {**DMC_DEFAULTS, **given}


def dmc_fields_from_hf(config: dict[str, Any]) -> dict[str, Any] | None:
    """The DMC metadata of an exported llama_dmc config.json (None for plain Llama)."""
    if config.get("model_type") != DMC_MODEL_TYPE:
        return None
    fields = {field: config.get(f"dmc_{field}", default) for field, default in DMC_DEFAULTS.items()}
    if "dmc_target_cr" not in config:  # exports before the rename
        fields["target_cr"] = config.get("dmc_compression_ratio")
    return fields


def dmc_hf_config(plain_config: dict[str, Any], dmc: dict[str, Any] | None) -> dict[str, Any]:
    """Turn a plain LlamaForCausalLM config.json into the DMC model's config.json."""
    fields = dmc_fields(dmc)
    config = dict(plain_config)
    config.update(
        model_type=DMC_MODEL_TYPE,
        architectures=[DMC_ARCHITECTURE],
        dmc_window_size=fields["window_size"],
        dmc_init_val=fields["init_val"],
        dmc_decision_channel=-1,
        dmc_target_cr=fields["target_cr"],
        dmc_decision_source=fields["decision_source"],
        dmc_merge_delay=fields["merge_delay"],
        dmc_kv_method=fields["kv_method"],
        dmc_decision_threshold=fields["decision_threshold"],
        auto_map={
            "AutoConfig": f"{CONFIG_MODULE}.{CONFIG_CLASS}",
            "AutoModelForCausalLM": f"{MODELING_MODULE}.{DMC_ARCHITECTURE}",
        },
    )
    if fields["layer_head_cr"] is not None:
        config["dmc_layer_head_cr"] = fields["layer_head_cr"]
    return config


def copy_modeling_files(out_dir: str | Path) -> list[str]:
    """Copy the transformers-side DMC model files next to the exported weights."""
    names = [f"{CONFIG_MODULE}.py", f"{MODELING_MODULE}.py"]
    missing = [n for n in names if not (HF_PACKAGE_DIR / n).is_file()]
    if missing:
        raise ValueError(f"DMC modeling files {missing} not found in {HF_PACKAGE_DIR}")
    for name in names:
        shutil.copy2(HF_PACKAGE_DIR / name, Path(out_dir) / name)
    return names
