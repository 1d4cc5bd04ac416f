"""LoRA adapters on Megatron's tensor-parallel linears, sharded like their base weights.

Legend: s sequence, b batch, I input features, O output features (this TP rank's part
where the base is split), r adapter rank.

An adapter adds (alpha / r) * B A x to the output of a linear. B starts at zero, so a
freshly adapted model is the original. The parameters sit on the linear itself
(`lora_A`, `lora_B`): the base weight keeps its state-dict key, and a checkpoint without
adapters loads into an adapted model.

- Column-parallel base (linear_qkv, linear_fc1; W is [O, I] split along O): A [r, I] is
  replicated, B [O, r] is split along O like W. The adapter's hidden h = A x passes
  Megatron's copy-to-TP region (identity forward, all-reduce backward), so A's gradient and
  the input's gradient from the adapter sum every rank's part.
- Row-parallel base (linear_proj, linear_fc2; W is [O, I] split along I): A [r, I] is
  split along I like W, B [O, r] replicated. The partial h = A_i x_i is all-reduced (Megatron's
  reduce-from-TP region: all-reduce forward, identity backward).

A is drawn for the whole (unsplit) matrix from a generator keyed by (seed, layer, linear) and
sliced to this rank, so every TP/PP layout starts from the same adapters.
`merge_adapters` folds B A into W (per shard: both products stay local).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

ATTENTION_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj")
MLP_LINEARS = ("mlp.linear_fc1", "mlp.linear_fc2")
ADAPTER_PARAMS = ("lora_A", "lora_B")
"""Parameter names an adapter adds to its linear."""

LORA_KEY = "lora"
"""Entry of a checkpoint's export metadata describing its adapters (rank, alpha, scale)."""


def _is_column(linear: torch.nn.Module) -> bool:
    return isinstance(linear, ColumnParallelLinear) or hasattr(linear, "output_size_per_partition")


def _full_a(rank: int, in_features: int, key: tuple[int, ...]) -> torch.Tensor:
    """PEFT's default: kaiming-uniform(a=sqrt(5)) rows, bound 1/sqrt(I)."""
    generator = torch.Generator().manual_seed(hash(key) & (2**63 - 1))
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound


def _attach(linear: torch.nn.Module, rank: int, scale: float, key: tuple[int, ...]) -> None:
    weight = linear.weight
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    out_local, in_local = weight.shape
    column = _is_column(linear)
    in_full = (
        in_local if column else in_local * parallel_state.get_tensor_model_parallel_world_size()
    )
    a_full = _full_a(rank, in_full, key)
    a = a_full if column else a_full[:, tp_rank * in_local : (tp_rank + 1) * in_local]
    lora_a = torch.nn.Parameter(a.to(weight.device, weight.dtype).contiguous())
    lora_b = torch.nn.Parameter(weight.new_zeros(out_local, rank))
    set_tensor_model_parallel_attributes(lora_b if column else lora_a, True, 0 if column else 1, 1)
    linear.register_parameter("lora_A", lora_a)
    linear.register_parameter("lora_B", lora_b)
    linear.lora_scale = scale
    linear.lora_enabled = True
    linear.lora_column = column
    linear.lora_hook = linear.register_forward_hook(_column_hook if column else _row_hook)


def _column_hook(linear, args, output):
    if not linear.lora_enabled:
        return output
    h_sbr = copy_to_tensor_model_parallel_region(args[0] @ linear.lora_A.t())
    out, bias = output
    return out + (h_sbr @ linear.lora_B.t()) * linear.lora_scale, bias


def _row_hook(linear, args, output):
    if not linear.lora_enabled:
        return output
    h_sbr = reduce_from_tensor_model_parallel_region(args[0] @ linear.lora_A.t())
    out, bias = output
    return out + (h_sbr @ linear.lora_B.t()) * linear.lora_scale, bias


def adapted_linears(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    for module in model.modules():
        if hasattr(module, "lora_hook"):
            yield module


def add_adapters(
    model: torch.nn.Module, rank: int, alpha: float, mlp: bool = False, seed: int = 0
) -> int:
    """Attach adapters to q/k/v/o (and the MLP when `mlp`) of every layer of this stage;
    returns how many linears got one. Call before wrapping the model in DDP."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be > 0; got {rank}")
    names = ATTENTION_LINEARS + (MLP_LINEARS if mlp else ())
    count = 0
    for layer in model.modules():
        if not isinstance(layer, TransformerLayer):
            continue
        for index, name in enumerate(names):
            linear = layer.get_submodule(name)
            if not isinstance(linear, (ColumnParallelLinear, RowParallelLinear)):
                raise ValueError(f"cannot put a LoRA adapter on {name} ({type(linear).__name__})")
            _attach(linear, rank, alpha / rank, (seed, layer.layer_number, index))
            _wrap_sharded_state_dict(linear, gated=name == "mlp.linear_fc1" and _gated(layer))
            count += 1
    return count


def _gated(layer: TransformerLayer) -> bool:
    return bool(layer.config.gated_linear_unit)


def _wrap_sharded_state_dict(linear: torch.nn.Module, gated: bool) -> None:
    """Shard lora_B with W's axis 0 (column) or lora_A with W's axis 1 (row); the other one
    is replicated. fc1 of a gated MLP stores [gate; up] halves: B follows W's factory."""
    axes = (
        {"weight": 0, "bias": 0, "lora_B": 0} if linear.lora_column else {"weight": 1, "lora_A": 1}
    )

    def sharded_state_dict(prefix="", sharded_offsets=(), metadata=None):
        state = linear.state_dict(prefix="", keep_vars=True)
        out = make_sharded_tensors_for_checkpoint(
            state,
            prefix,
            axes,
            sharded_offsets,
            tp_group=linear.tp_group,
            dp_cp_group=(metadata or {}).get("dp_cp_group"),
        )
        if gated:
            key = f"{prefix}lora_B"
            singleton = (metadata or {}).get("singleton_local_shards", False)
            out[key] = apply_swiglu_sharded_factory(out[key], sharded_offsets, singleton)
        return out

    linear.sharded_state_dict = sharded_state_dict


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` as its base weights alone (a no-op without adapters)."""
    linears = list(adapted_linears(model))
    for linear in linears:
        linear.lora_enabled = False
    try:
        yield
    finally:
        for linear in linears:
            linear.lora_enabled = True


@torch.no_grad()
def merged_weight(
    weight_OI: torch.Tensor, a_rI: torch.Tensor, b_Or: torch.Tensor, scale: float
) -> torch.Tensor:
    """W + scale * B A, computed in fp32 and returned in W's dtype."""
    return (weight_OI.float() + scale * (b_Or.float() @ a_rI.float())).to(weight_OI.dtype)


@torch.no_grad()
def merge_adapters(model: torch.nn.Module) -> int:
    """Fold every adapter into its base weight and remove it; returns how many."""
    linears = list(adapted_linears(model))
    for linear in linears:
        linear.weight.copy_(
            merged_weight(linear.weight, linear.lora_A, linear.lora_B, linear.lora_scale)
        )
        linear.lora_hook.remove()
        for name in ADAPTER_PARAMS:
            delattr(linear, name)
        del linear.sharded_state_dict, linear.lora_hook
    return len(linears)


def drop_absent_adapters(sharded: dict, directory) -> list[str]:
    """Remove from a load request the adapters that the checkpoint at `directory` lacks (a
    model without adapters: they keep their fresh values); returns their state-dict keys."""
    return drop_absent_params(sharded, directory, is_adapter_key)


def drop_absent_params(sharded: dict, directory, selected: Callable[[str], bool]) -> list[str]:
    """Remove from a load request the `selected` parameters that the checkpoint at
    `directory` lacks (they keep their fresh values); returns their state-dict keys."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    wanted = [
        key for key, value in sharded.items() if selected(key) and isinstance(value, ShardedBase)
    ]
    if not wanted:
        return []
    saved = dist_checkpointing.load_tensors_metadata(str(directory))
    absent = [key for key in wanted if _checkpoint_key(sharded[key]) not in saved]
    for key in absent:
        del sharded[key]
    return absent


def _checkpoint_key(value) -> str:
    return value.key


def is_adapter_key(key: str) -> bool:
    """A checkpoint or state-dict key of an adapter parameter."""
    return key.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def adapter_keys(weight_key: str, available) -> tuple[str, ...]:
    """(A key, B key) of the adapter on the weight `weight_key` when `available` (a
    container of checkpoint keys) holds them, else ()."""
    if not weight_key.endswith(".weight"):
        return ()
    stem = weight_key[: -len("weight")]
    keys = tuple(stem + name for name in ADAPTER_PARAMS)
    return keys if all(k in available for k in keys) else ()
