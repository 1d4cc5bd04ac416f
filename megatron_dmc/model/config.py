"""The shape of a Llama-architecture model, loaded from `configs/<name>.yaml`.

`ModelConfig.to_transformer_config(tp, pp)` turns it into a Megatron-Core
`TransformerConfig` for a Llama block (RMSNorm, SwiGLU MLP, no biases, rotate-half
RoPE) with the settings that work on CPU (see `megatron_dmc.compat.cpu`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from megatron.core.transformer import TransformerConfig

from megatron_dmc.compat import cuda_available
from megatron_dmc.schema.llama import LlamaShape

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    """Transformer blocks."""
    hidden_size: int
    """Residual stream width."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (= num_attention_heads for multi-head attention)."""
    ffn_hidden_size: int
    """Width of each of the gate and up projections of the SwiGLU MLP."""
    vocab_size: int
    """Tokenizer vocabulary (embedding rows)."""
    max_position_embeddings: int
    """Longest sequence the model is built for."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Output layer shares the input embedding matrix."""
    init_method_std: float = 0.02
    """Std of the normal init of fresh weights."""
    head_dim: int | None = None
    """Channels per head; None means hidden_size / num_attention_heads."""
    make_vocab_size_divisible_by: int = 128
    """Megatron's --make-vocab-size-divisible-by: when the tensor parallel size does not
    divide vocab_size, the embedding and output layer get zero rows up to a multiple of
    this times the tensor parallel size (`padded_vocab_size`); export strips them."""

    def __post_init__(self) -> None:
        for field in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "make_vocab_size_divisible_by",
        ):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1; got {getattr(self, field)}")
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({self.num_query_groups})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set head_dim explicitly"
            )

    def padded_vocab_size(self, tp: int) -> int:
        """Embedding rows of the Megatron model at tensor parallel size `tp`."""
        if self.vocab_size % tp == 0:
            return self.vocab_size
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_yaml(cls, name_or_path: str | Path) -> ModelConfig:
        """Load `configs/<name>.yaml` for a bare name (e.g. "tiny_gqa"), else a file path."""
        path = Path(name_or_path)
        if path.suffix not in (".yaml", ".yml"):
            path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise ValueError(f"no model config at {path}; known names: {known}")
        return cls.from_dict(yaml.safe_load(path.read_text()))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown model config keys {unknown}; expected some of {sorted(known)}"
            )
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(values))
        if missing:
            raise ValueError(f"model config is missing required keys {missing}")
        return cls(**values)

    @classmethod
    def from_shape(cls, shape: LlamaShape) -> ModelConfig:
        """The Megatron-side view of an HF config.json shape."""
        return cls(
            num_layers=shape.num_hidden_layers,
            hidden_size=shape.hidden_size,
            num_attention_heads=shape.num_attention_heads,
            num_query_groups=shape.num_key_value_heads,
            ffn_hidden_size=shape.intermediate_size,
            vocab_size=shape.vocab_size,
            max_position_embeddings=shape.max_position_embeddings,
            rotary_base=shape.rope_theta,
            norm_epsilon=shape.rms_norm_eps,
            tie_embeddings=shape.tie_word_embeddings,
            head_dim=shape.head_dim,
        )

    def to_shape(self, dtype: str = "float32", decision_heads: bool = False) -> LlamaShape:
        """The HF config.json view of this model (checkpoint metadata, exports)."""
        return LlamaShape(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups,
            head_dim=self.kv_channels,
            rms_norm_eps=self.norm_epsilon,
            rope_theta=self.rotary_base,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_embeddings,
            dtype=dtype,
            dmc_decision_heads=decision_heads,
        )

    def check_parallel(self, tp: int, pp: int, sequence_parallel: bool = False) -> None:
        """Reject layouts this model cannot be split into, before any work is done."""
        _check_divides("num_attention_heads", self.num_attention_heads, "tensor", tp)
        _check_divides("num_query_groups", self.num_query_groups, "tensor", tp)
        _check_divides("ffn_hidden_size", self.ffn_hidden_size, "tensor", tp)
        _check_divides("num_layers", self.num_layers, "pipeline", pp)
        if sequence_parallel and not cuda_available():
            raise ValueError(
                "sequence parallel needs the Transformer-Engine/apex norms (GPU); on CPU "
                "run without sequence_parallel"
            )
        if sequence_parallel and tp == 1:
            raise ValueError("sequence parallel needs tensor parallel size > 1")

    def to_transformer_config(
        self,
        tp: int = 1,
        pp: int = 1,
        params_dtype: torch.dtype = torch.float32,
        sequence_parallel: bool = False,
        **overrides: Any,
    ) -> TransformerConfig:
        """A Megatron-Core config for this shape; `overrides` are TransformerConfig fields."""
        self.check_parallel(tp, pp, sequence_parallel)
        on_cpu = not cuda_available()
        fields = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            kv_channels=self.kv_channels,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            sequence_parallel=sequence_parallel,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_method_std,
            params_dtype=params_dtype,
            pipeline_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            use_cpu_initialization=on_cpu,
            batch_p2p_sync=not on_cpu,
            **_NO_FUSIONS,
        )
        fields.update(overrides)
        return TransformerConfig(**fields)


_NO_FUSIONS = dict(
    gradient_accumulation_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
    masked_softmax_fusion=False,
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    cross_entropy_loss_fusion=False,
)


def _check_divides(field: str, value: int, kind: str, size: int) -> None:
    if size < 1 or value % size != 0:
        raise ValueError(
            f"{field} ({value}) is not divisible by the {kind} parallel size ({size}); "
            f"pick a {kind} parallel size that divides it"
        )
