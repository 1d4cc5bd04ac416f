"""The saved Megatron-LM `args` of a torch-format checkpoint -> LlamaShape and DMC fields.

Missing attributes take Megatron-LM's argument defaults, so an args namespace that
does not describe a Llama (SwiGLU, RMSNorm, RoPE, no biases) is refused, naming the flag.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from megatron_dmc.schema.llama import DTYPES, LlamaShape

_REQUIRED_LLAMA_FLAGS: tuple[tuple[str, Any, Any], ...] = (
    # (args attribute, Megatron-LM default, value a Llama needs)
    ("swiglu", False, True),
    ("normalization", "LayerNorm", "RMSNorm"),
    ("position_embedding_type", "learned_absolute", "rope"),
    ("add_bias_linear", True, False),
    ("add_qkv_bias", False, False),
    ("rotary_interleaved", False, False),
    ("rotary_percent", 1.0, 1.0),
    ("rotary_seq_len_interpolation_factor", None, None),
    ("use_rope_scaling", False, False),
    ("apply_layernorm_1p", False, False),
    ("qk_layernorm", False, False),
    ("num_experts", None, None),
    ("window_size", None, None),
)


def check_llama_args(args: argparse.Namespace) -> None:
    for name, default, needed in _REQUIRED_LLAMA_FLAGS:
        value = getattr(args, name, default)
        if value != needed:
            raise ValueError(
                f"checkpoint args {name}={value!r}: only Llama models ({name}={needed!r}) "
                "convert exactly"
            )


def shape_from_args(
    args: argparse.Namespace, vocab_size: int | None, dtype: torch.dtype
) -> LlamaShape:
    """The Llama shape the args describe; `vocab_size` overrides args.vocab_size.

    Without either, the padded vocabulary is kept (export then has padded rows too).
    """
    check_llama_args(args)
    heads = args.num_attention_heads
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
    padded = getattr(args, "padded_vocab_size", None)
    vocab = vocab_size or getattr(args, "vocab_size", None) or padded
    if vocab is None:
        raise ValueError("checkpoint args give no vocabulary size; pass --vocab-size")
    if padded is not None and vocab > padded:
        raise ValueError(f"vocab_size={vocab} exceeds the checkpoint's padded_vocab_size={padded}")
    return LlamaShape(
        vocab_size=vocab,
        hidden_size=args.hidden_size,
        intermediate_size=args.ffn_hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=getattr(args, "kv_channels", None) or args.hidden_size // heads,
        rms_norm_eps=getattr(args, "norm_epsilon", 1e-5),
        rope_theta=float(getattr(args, "rotary_base", 10000)),
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
        dtype=_dtype_name(dtype),
    )


def _dtype_name(dtype: torch.dtype) -> str:
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"checkpoint weights are {dtype}; only {list(DTYPES)} are supported")
    return names[dtype]


def dmc_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """DMC export fields from the release's flags; None when the run was not DMC."""
    if not hasattr(args, "dmc_cr") and not hasattr(args, "dmc_window_size"):
        return None
    return {
        "window_size": getattr(args, "dmc_window_size", 12),
        "init_val": float(getattr(args, "dmc_init_val", 5.0)),
        "target_cr": getattr(args, "dmc_cr", None),
        "layer_head_cr": None,
    }
