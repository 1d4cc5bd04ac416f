"""DMC decisions out of the layers: a collector per model, and the pipeline carry row.

Legend: B batch, G KV heads (this TP rank), T time, S sequence, H hidden size,
L layers, N total KV heads.

Each `DMCSelfAttention` records its STE-hard decisions into the `DecisionCollector`
of the model that owns it (never a module global). Per forward pass the collector
sums them per sequence ([B], with gradient); across tensor-parallel ranks the sum is
all-reduced (identity backward), and across pipeline stages it travels as one extra
sequence row of the activation that the schedule already sends (`append_carry_row`,
`split_carry_row`), so its gradient comes back through the ordinary p2p backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

CARRY_CHANNELS = 3
"""A float32 sum sent in the pipeline dtype as hi + mid + lo parts (exact in bf16 too)."""


@dataclass
class DecisionSums:
    alpha_sum_B: torch.Tensor
    """Per sequence: sum of STE-hard decisions over all layers, KV heads and tokens seen
    so far (the whole model on the last pipeline stage). Carries the gradient."""

    count: int
    """Decisions summed per sequence: layers x KV heads x tokens (whole model)."""


class DecisionCollector:
    """Per-forward record of one model's DMC decisions, plus running stats for logging."""

    def __init__(self, noise_seed: int = 0) -> None:
        self.noise_seed = noise_seed
        self.step = 0
        self._microbatch = -1
        self._sums_B: list[torch.Tensor] = []
        self.length = 0
        self._hard_sum_LG: dict[int, torch.Tensor] = {}
        self._hard_count_L: dict[int, int] = {}

    def start_step(self, step: int) -> None:
        """Key the Gumbel noise of the coming forward passes by the training step."""
        self.step = step
        self._microbatch = -1

    def begin_forward(self) -> None:
        self._sums_B.clear()
        self._microbatch += 1

    def record(self, layer_number: int, alpha_ste_BGT: torch.Tensor) -> None:
        self._sums_B.append(alpha_ste_BGT.float().sum(dim=(1, 2)))
        self.length = alpha_ste_BGT.shape[-1]
        hard_G = alpha_ste_BGT.detach().float().sum(dim=(0, 2))
        previous = self._hard_sum_LG.get(layer_number)
        self._hard_sum_LG[layer_number] = hard_G if previous is None else previous + hard_G
        count = alpha_ste_BGT.shape[0] * alpha_ste_BGT.shape[2]
        self._hard_count_L[layer_number] = self._hard_count_L.get(layer_number, 0) + count

    def record_uncompressed(self, batch: int, length: int, device: torch.device) -> None:
        """A layer that ran with compression off: no decision, a zero sum, stats untouched."""
        self._sums_B.append(torch.zeros(batch, device=device))
        self.length = length

    def local_sum_B(self) -> torch.Tensor:
        """This stage's decisions per sequence, summed over its layers and all TP heads."""
        assert self._sums_B, "no DMC layer recorded a decision in this forward pass"
        return reduce_from_tensor_model_parallel_region(torch.stack(self._sums_B).sum(0))

    def generator(self, layer_number: int) -> torch.Generator:
        """Gumbel noise source for one layer in the current forward pass.

        Keyed by the global microbatch index m * DP + dp_rank, the order in which
        Megatron's samplers deal microbatches to data-parallel ranks, so the noise of a
        sample does not depend on the TP/PP/DP layout.
        """
        dp_rank, dp_size = 0, 1
        if dist.is_initialized():
            dp_rank = parallel_state.get_data_parallel_rank()
            dp_size = parallel_state.get_data_parallel_world_size()
        global_microbatch = self._microbatch * dp_size + dp_rank
        key = (self.noise_seed, self.step, global_microbatch, layer_number)
        return torch.Generator().manual_seed(hash(key) & (2**63 - 1))

    def reset_stats(self) -> None:
        self._hard_sum_LG.clear()
        self._hard_count_L.clear()

    def local_stats(self) -> dict[int, tuple[torch.Tensor, int]]:
        """{layer_number: (sum of hard decisions per local KV head, decisions per head)}."""
        return {
            layer: (self._hard_sum_LG[layer], self._hard_count_L[layer])
            for layer in sorted(self._hard_sum_LG)
        }


def append_carry_row(hidden_SBH: torch.Tensor, sum_B: torch.Tensor) -> torch.Tensor:
    """[S+1, B, H]: hidden states plus one row whose first channels carry sum_B."""
    _, b, h = hidden_SBH.shape
    assert h >= CARRY_CHANNELS, "hidden size too small to carry the decision sum"
    parts, rest_B = [], sum_B.float()
    for _ in range(CARRY_CHANNELS):
        part_B = rest_B.to(hidden_SBH.dtype)
        parts.append(part_B)
        rest_B = rest_B - part_B.float()
    row_1BH = torch.cat(
        [torch.stack(parts, dim=-1), hidden_SBH.new_zeros(b, h - CARRY_CHANNELS)], dim=-1
    )
    return torch.cat([hidden_SBH, row_1BH[None]], dim=0)


def split_carry_row(received_SBH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `append_carry_row`: ([S, B, H] hidden states, float32 sum [B])."""
    sum_B = received_SBH[-1, :, :CARRY_CHANNELS].float().sum(dim=-1)
    return received_SBH[:-1], sum_B


def gather_alpha_means(model: torch.nn.Module, num_layers: int, num_kv_heads: int) -> torch.Tensor:
    """Mean hard alpha per (layer, KV head), [L, N], over everything recorded since the
    last `reset_stats()`, on every rank. Collective: all ranks must call it."""
    sum_LN = torch.zeros(num_layers, num_kv_heads, dtype=torch.float64)
    count_LN = torch.zeros_like(sum_LN)
    for collector in {id(c): c for c in _collectors(model)}.values():
        for layer, (sum_G, count) in collector.local_stats().items():
            g = sum_G.numel()
            first = parallel_state.get_tensor_model_parallel_rank() * g
            sum_LN[layer - 1, first : first + g] += sum_G.double().cpu()
            count_LN[layer - 1, first : first + g] += count
    if dist.is_initialized():
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        stacked = torch.stack([sum_LN, count_LN]).to(device)
        dist.all_reduce(stacked)
        sum_LN, count_LN = stacked.cpu()
    return sum_LN / count_LN.clamp_min(1)


def _collectors(model: torch.nn.Module) -> list[DecisionCollector]:
    return [m.collector for m in model.modules() if getattr(m, "collector", None) is not None]
