"""Load an HF Llama directory (plain or DMC export) into LlamaForInference.

config.json + *.safetensors (single file or sharded with an index). A DMC export carries
`dmc_window_size` and `dmc_init_val` (model_type "llama_dmc"), and optionally
`dmc_decision_source` ("channel" | "heads": then each layer has
`self_attn.dmc_decision_proj.weight` [2G, hidden]), `dmc_merge_delay` and `dmc_kv_method`
("dmc" | "dms": DMS exports carry dmc_window_size 1); a plain Llama runs vanilla.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from megatron_dmc.inference.decisions import ForcedRate
from megatron_dmc.inference.model import LlamaForInference
from megatron_dmc.ops import DMCConfig
from megatron_dmc.schema.llama import llama_shape_from_hf, read_hf_config

MODES = ("auto", "dmc", "vanilla")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def dmc_config_from_hf(config: dict[str, Any], mode: str = "auto") -> DMCConfig | None:
    """The DMCConfig a config.json asks for under `mode` (auto: DMC iff the fields exist)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    has_fields = "dmc_window_size" in config and "dmc_init_val" in config
    if config.get("model_type") == "llama_dmc" and not has_fields:
        raise ValueError(
            "config.json says model_type 'llama_dmc' but lacks dmc_window_size / dmc_init_val; "
            "re-export the checkpoint with tools/convert_checkpoint.py export-hf"
        )
    if mode == "vanilla" or (mode == "auto" and not has_fields):
        return None
    if not has_fields:
        raise ValueError(
            "DMC inference was requested but config.json has no DMC fields (dmc_window_size, "
            "dmc_init_val): this is a plain Llama checkpoint. Use mode='vanilla', or export "
            "a DMC-trained checkpoint"
        )
    if config.get("dmc_decision_channel", -1) != -1:
        raise ValueError(
            "only dmc_decision_channel=-1 (the last channel of each head) is supported"
        )
    return DMCConfig(
        window_size=int(config["dmc_window_size"]),
        init_val=float(config["dmc_init_val"]),
        decision_source=str(config.get("dmc_decision_source", "channel")),
        merge_delay=int(config.get("dmc_merge_delay", 0)),
        kv_method=str(config.get("dmc_kv_method", "dmc")),
        decision_threshold=float(config.get("dmc_decision_threshold", 0.0)),
    )


def load_model(
    model_dir: str | Path,
    mode: str = "auto",
    forced_cr: float | None = None,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
) -> LlamaForInference:
    """Build the model from config.json and load every safetensors weight (unknown keys fail)."""
    config = read_hf_config(model_dir)
    shape = llama_shape_from_hf(config)
    dmc = dmc_config_from_hf(config, mode)
    forced = ForcedRate(forced_cr) if forced_cr is not None else None
    with torch.device("meta"):
        model = LlamaForInference(shape, dmc, forced)
    model = model.to_empty(device=device).to(dtype or shape.torch_dtype)
    if shape.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, read_safetensors(model_dir))
    return model.eval()


def read_safetensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir}")
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            weights.update(load_file(str(path)))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: unreadable safetensors file ({error})") from error
    return {k: v for k, v in weights.items() if not k.endswith(_IGNORED_SUFFIXES)}


def _check_names(model: LlamaForInference, weights: dict[str, torch.Tensor]) -> None:
    expected = set(model.state_dict())
    if model.shape.tie_word_embeddings:
        expected.discard("lm_head.weight")
    weights = {k for k in weights if not k.endswith(_IGNORED_SUFFIXES)}
    unknown, missing = sorted(weights - expected), sorted(expected - weights)
    if unknown or missing:
        raise ValueError(
            f"checkpoint does not match the Llama layout: unknown {unknown[:5]}, "
            f"missing {missing[:5]} (of {len(unknown)} / {len(missing)})"
        )


def load_weights(model: LlamaForInference, weights: dict[str, torch.Tensor]) -> None:
    if model.shape.tie_word_embeddings:
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    _check_names(model, weights)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, tensor in weights.items():
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)


def from_transformers(hf_model: torch.nn.Module, mode: str = "auto") -> LlamaForInference:
    """The engine over a loaded transformers Llama (plain or DMC), sharing its weights."""
    config = hf_model.config.to_dict()
    shape = llama_shape_from_hf(config)
    with torch.device("meta"):
        model = LlamaForInference(shape, dmc_config_from_hf(config, mode))
    weights = dict(hf_model.state_dict())
    if shape.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    _check_names(model, weights)
    model.load_state_dict(weights, strict=False, assign=True)
    if shape.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
