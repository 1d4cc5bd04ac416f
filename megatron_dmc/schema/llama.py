"""The Llama architecture, defined once: `LlamaShape`, in HF config.json names.

Read from `configs/<name>.yaml` (`LlamaShape.from_yaml`), from HF config.json
(`llama_shape_from_hf`, which refuses everything that cannot be converted exactly, before any
tensor is read) and from checkpoint metadata (`LlamaShape.from_dict`); written to config.json
by `hf_config_from_shape`. `megatron_dmc.model.config.transformer_config` turns it into a
Megatron-Core `TransformerConfig`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
"""Where `LlamaShape.from_yaml` looks up a bare model name."""

SUPPORTED_ROPE_TYPES = ("default",)
"""rope_type values converted exactly; linear, dynamic, yarn, longrope and llama3 are not."""

ACCEPTED_MODEL_TYPES = ("llama", "llama_dmc")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_IGNORED_FIELDS_THAT_MUST_BE_FALSY = ("attention_bias", "mlp_bias", "sliding_window")


@dataclass(frozen=True)
class LlamaShape:
    """Sizes and constants of a Llama decoder; the HF config.json names are kept."""

    vocab_size: int
    """Real vocabulary size (rows of the HF embedding; Megatron may pad beyond it)."""
    hidden_size: int
    """Residual stream width."""
    intermediate_size: int
    """FFN width of one of the two gated projections (gate or up); Megatron's ffn_hidden_size."""
    num_hidden_layers: int
    """Transformer blocks; Megatron's num_layers."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """KV heads; = num_attention_heads for MHA, Megatron's num_query_groups."""
    head_dim: int | None = None
    """Channels per head (Megatron's kv_channels); may differ from hidden/heads. None (only
    when constructing) means hidden_size / num_attention_heads; the record then holds it."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is built for."""
    tie_word_embeddings: bool = False
    """Output layer shares the input embedding matrix."""
    dtype: str = "float32"
    """Storage dtype of the weights ("float32", "bfloat16" or "float16")."""
    dmc_decision_heads: bool = False
    """The model carries DMC decision heads (decision_source "heads"): one more tensor per
    layer, `self_attn.dmc_decision_proj.weight` [2 * KV heads, hidden]."""
    init_method_std: float = 0.02
    """Std of the normal init of fresh weights (Megatron-side only; not in config.json)."""
    make_vocab_size_divisible_by: int = 128
    """Megatron's --make-vocab-size-divisible-by: when the tensor parallel size does not
    divide vocab_size, the embedding and output layer get zero rows up to a multiple of
    this times the tensor parallel size (`padded_vocab_size`); export strips them."""

    def __post_init__(self) -> None:
        for field in _POSITIVE_FIELDS:
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1; got {getattr(self, field)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; fix config.json or the YAML"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; use one of {list(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def queries_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def padded_vocab_size(self, tp: int) -> int:
        """Embedding rows of the Megatron model at tensor parallel size `tp`."""
        if self.vocab_size % tp == 0:
            return self.vocab_size
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def check_parallel(self, tp: int, pp: int) -> None:
        """Reject tensor/pipeline sizes this model cannot be split into, before any work."""
        _check_divides("num_attention_heads", self.num_attention_heads, "tensor", tp)
        _check_divides("num_key_value_heads", self.num_key_value_heads, "tensor", tp)
        _check_divides("intermediate_size", self.intermediate_size, "tensor", tp)
        _check_divides("num_hidden_layers", self.num_hidden_layers, "pipeline", pp)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LlamaShape:
        """A model config YAML or checkpoint metadata dict; unknown or missing keys refused.
        The keys of model YAMLs written before the record took config.json's names (e.g. a
        main job's `model.yaml`) are read under their new names."""
        values = _renamed_earlier_keys(values)
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown model config keys {unknown}; expected some of {sorted(known)}"
            )
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        missing = sorted(required - set(values))
        if missing:
            raise ValueError(f"model config is missing required keys {missing}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, name_or_path: str | Path) -> LlamaShape:
        """Load `configs/<name>.yaml` for a bare name (e.g. "tiny_gqa"), else a file path."""
        path = named_yaml(name_or_path, CONFIG_DIR, "model config")
        return cls.from_dict(yaml.safe_load(path.read_text()))


EARLIER_KEYS = {
    "num_layers": "num_hidden_layers",
    "num_query_groups": "num_key_value_heads",
    "ffn_hidden_size": "intermediate_size",
    "rotary_base": "rope_theta",
    "norm_epsilon": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
}
"""Keys of the model YAMLs written before the shape took config.json's names -> the names."""


def _renamed_earlier_keys(values: dict[str, Any]) -> dict[str, Any]:
    both = sorted(old for old, new in EARLIER_KEYS.items() if old in values and new in values)
    if both:
        pairs = ", ".join(f"{old}/{EARLIER_KEYS[old]}" for old in both)
        raise ValueError(f"model config gives both spellings of {pairs}; keep the second")
    return {EARLIER_KEYS.get(key, key): value for key, value in values.items()}


def named_yaml(name_or_path: str | Path, folder: Path, what: str) -> Path:
    """`folder/<name>.yaml` for a bare name, else the YAML path given; it must exist."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ValueError(f"no {what} at {path}; known {what}s: {known}, or give a YAML path")
    return path


_POSITIVE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "make_vocab_size_divisible_by",
)


def _check_divides(field: str, value: int, kind: str, size: int) -> None:
    if size < 1 or value % size != 0:
        raise ValueError(
            f"{field} ({value}) is not divisible by the {kind} parallel size ({size}); "
            f"pick a {kind} parallel size that divides it"
        )


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """config.json of an HF model directory, as a plain dict."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: {hf_dir} is not a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def llama_shape_from_hf(config: dict[str, Any]) -> LlamaShape:
    """Validate an HF Llama config.json dict and extract its shape; refuse what is not exact."""
    _check_convertible(config)
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    return LlamaShape(
        vocab_size=config["vocab_size"],
        hidden_size=hidden,
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or hidden // heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(_rope_parameters(config).get("rope_theta", 10000.0)),
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        dtype=_dtype_name(config),
        dmc_decision_heads=_decision_heads(config),
    )


def _decision_heads(config: dict[str, Any]) -> bool:
    if config.get("model_type") != "llama_dmc":
        return False
    source = config.get("dmc_decision_source", "channel")
    if source not in ("channel", "heads", "query"):
        raise ValueError(
            f"config.json dmc_decision_source={source!r}: expected 'channel', 'heads' or 'query'"
        )
    return source == "heads"


def _check_convertible(config: dict[str, Any]) -> None:
    model_type = config.get("model_type")
    if model_type not in ACCEPTED_MODEL_TYPES:
        raise ValueError(
            f"config.json model_type={model_type!r}: only {ACCEPTED_MODEL_TYPES} are converted"
        )
    for field in _IGNORED_FIELDS_THAT_MUST_BE_FALSY:
        if config.get(field):
            raise ValueError(
                f"config.json {field}={config[field]!r} cannot be converted: the Megatron "
                "model has no attention/MLP biases and no sliding-window attention"
            )
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={config['hidden_act']!r}: only 'silu' (SwiGLU)")
    for rope_type in _rope_types(config):
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"config.json rope scaling type {rope_type!r} is not implemented; supported: "
                f"{list(SUPPORTED_ROPE_TYPES)} (not linear, dynamic, yarn, longrope, llama3)"
            )
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
        if not isinstance(config.get(field), int):
            raise ValueError(f"config.json field {field} is missing or not an integer")


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 writes rope_parameters; older configs rope_theta + rope_scaling."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "rope_theta" in config:
        params.setdefault("rope_theta", config["rope_theta"])
    return params


def _rope_types(config: dict[str, Any]) -> list[str]:
    """Types named by rope_parameters and rope_scaling (either may carry scaling)."""
    found = [config.get("rope_parameters") or {}, config.get("rope_scaling") or {}]
    return [p.get("rope_type", p.get("type", "default")) for p in found]


def _dtype_name(config: dict[str, Any]) -> str:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"config.json dtype {name!r} is not supported; use one of {list(DTYPES)}")
    return name


def hf_config_from_shape(shape: LlamaShape, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A plain LlamaForCausalLM config.json: `base` (the source config) with the shape on top."""
    config = {k: v for k, v in (base or {}).items() if not k.startswith("dmc_")}
    for stale in ("auto_map", "rope_scaling", "rope_theta", "torch_dtype"):
        config.pop(stale, None)
    config.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        hidden_act="silu",
        rms_norm_eps=shape.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
        dtype=shape.dtype,
    )
    return config
