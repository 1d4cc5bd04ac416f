"""Write a Megatron-LM torch-format checkpoint in the NVIDIA DMC release's layout.

    ROOT/latest_checkpointed_iteration.txt
    ROOT/iter_0000123/mp_rank_0R/model_optim_rng.pt  {"model", "args", "iteration", ...}

The weights come from a tiny HF Llama; names are Megatron-Core Transformer-Engine names,
TP shards are cut as Megatron-LM cuts them, the vocabulary is padded.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from megatron_dmc.convert.hf_io import HFCheckpoint
from megatron_dmc.convert.mapping import GATE_UP, Entry, entries

ITERATION = 123


def release_args(
    hf: HFCheckpoint, tp: int, padded_vocab: int, **overrides: Any
) -> argparse.Namespace:
    shape = hf.shape
    fields = dict(
        num_layers=shape.num_hidden_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        group_query_attention=shape.num_key_value_heads != shape.num_attention_heads,
        num_query_groups=shape.num_key_value_heads,
        kv_channels=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        padded_vocab_size=padded_vocab,
        vocab_size=None,
        norm_epsilon=shape.rms_norm_eps,
        rotary_base=int(shape.rope_theta),
        untie_embeddings_and_output_weights=not shape.tie_word_embeddings,
        swiglu=True,
        normalization="RMSNorm",
        position_embedding_type="rope",
        add_bias_linear=False,
        add_qkv_bias=False,
        rotary_percent=1.0,
        rotary_interleaved=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        bf16=False,
        params_dtype=torch.float32,
        use_mcore_models=True,
        transformer_impl="transformer_engine",
        dmc_cr=4.0,
        dmc_window_size=12,
        dmc_init_val=5.0,
        dmc_temp=0.1,
        dmc_finetune=True,
    )
    return argparse.Namespace(**{**fields, **overrides})


def _shard(entry: Entry, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    axis = entry.rule.tp_axis
    if axis is None:
        return full.clone()
    if entry.rule.fuse == GATE_UP:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]]).clone()
    return full.chunk(tp, dim=axis)[rank].clone()


def _pad_vocab(entry: Entry, full: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    if entry.layer is not None or entry.rule.tp_axis != 0:
        return full
    padding = torch.randn(padded_vocab - full.shape[0], full.shape[1])
    return torch.cat([full, padding.to(full.dtype)])


def write_release(
    hf_dir: Path, root: Path, tp: int = 1, padded_vocab: int = 128, **arg_overrides: Any
) -> Path:
    """Write ROOT in release layout from the HF Llama at hf_dir; return ROOT."""
    hf = HFCheckpoint(hf_dir)
    args = release_args(hf, tp, padded_vocab, **arg_overrides)
    full = {}
    for entry in entries(hf.shape):
        tensor = hf.read([entry])[entry.megatron]
        full[entry] = _pad_vocab(entry, tensor, padded_vocab)
    iteration_dir = root / f"iter_{ITERATION:07d}"
    for rank in range(tp):
        model = {e.te: _shard(e, t, tp, rank) for e, t in full.items()}
        model.update(
            {e.te.rsplit(".", 1)[0] + "._extra_state": None for e in full if e.rule.tp_axis}
        )
        state = {"model": model, "args": args, "iteration": ITERATION, "checkpoint_version": 3.0}
        (iteration_dir / f"mp_rank_{rank:02d}").mkdir(parents=True)
        torch.save(state, iteration_dir / f"mp_rank_{rank:02d}" / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    return root
