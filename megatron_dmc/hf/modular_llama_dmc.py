"""Llama with Dynamic Memory Compression (DMC) for transformers, and its compressed KV cache.

Self-contained (imports only torch and transformers) so that it can be copied next to an
exported checkpoint and loaded with `trust_remote_code=True`. The DMC maths below is a compact
copy of `megatron_dmc.ops`; the test suite checks that both give the same outputs.

Legend: B batch, H query heads, G KV heads, R = H/G query heads per KV head, T time, D head dim,
E = 2*D + 1 (a window contribution w*k, w*v, w), A = D + 2 and F = D + 1 (augmented keys and
values of the one-call attention), N = B*G cache rows (one per sequence and KV head), P pages,
S slots per page, M pages per row, L gathered slots per row, K tail tokens, W window,
C = L + T keys a call's tokens may see, X = R*T stacked queries of a KV head, U = W + T
(the open slot's window history, then the call's tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_llama_dmc import LlamaDMCConfig

HARD_MASK_VALUE = -1.0e4
"""exp(-1e4) is exactly 0 in every float dtype, so hard masking is exact."""

PAGE_GROWTH = 1.25
"""A layer's page pool grows to at least this multiple of its old capacity when full."""


# ----------------------------------------------------------------------------------------------
# DMC maths (the parallel form of `megatron_dmc.ops`)
# ----------------------------------------------------------------------------------------------


def zero_decision_channel(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[..., :-1], torch.zeros_like(x[..., -1:])], dim=-1)


def rope_without_decision_channel(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Zero channel D-1, rotate-half RoPE, zero channel D-1 again (as the release does)."""
    x = zero_decision_channel(x)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return zero_decision_channel(x * cos + rotated * sin)


def importance_weights(q_BHTD: torch.Tensor, num_kv_heads: int, init_value: float) -> torch.Tensor:
    """omega = sigmoid(mean over the KV group of q[D-1] + c) + eps, [B, G, T]."""
    b, h, t, _ = q_BHTD.shape
    qbar_BGT = q_BHTD[..., -1].reshape(b, num_kv_heads, h // num_kv_heads, t).mean(dim=2)
    return torch.sigmoid(qbar_BGT + init_value) + torch.finfo(q_BHTD.dtype).eps


def merge_decisions(
    k_BGTD: torch.Tensor,
    first_B: torch.Tensor,
    init_value: float,
    temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """alpha (1 = merge), [B, G, T]: hard without a temperature, else Gumbel-sigmoid.

    The first real token of each row (index first_B) always appends.
    """
    logits_BGT = k_BGTD[..., -1] - init_value
    if temperature is None:
        alpha_BGT = (logits_BGT > 0).to(k_BGTD.dtype)
    else:
        tiny, eps = torch.finfo(logits_BGT.dtype).tiny, torch.finfo(logits_BGT.dtype).eps
        u = torch.rand(
            logits_BGT.shape, generator=generator, dtype=logits_BGT.dtype, device=logits_BGT.device
        ).clamp(tiny, 1.0 - eps)
        noise_BGT = torch.log(u) - torch.log1p(-u)
        alpha_BGT = torch.sigmoid((logits_BGT + noise_BGT) / temperature)
    first_B1T = torch.arange(k_BGTD.shape[2], device=k_BGTD.device) == first_B[:, None, None]
    return alpha_BGT.masked_fill(first_B1T, 0.0)


def _shift_time(x_BGT_: torch.Tensor, offset: int, time_dim: int) -> torch.Tensor:
    """x[t - offset] along time_dim, zeros where t < offset."""
    length = x_BGT_.shape[time_dim]
    pad = [0, 0] * (x_BGT_.dim() - 1 - time_dim % x_BGT_.dim()) + [offset, 0]
    return F.pad(x_BGT_, pad).narrow(time_dim, 0, length)


def windowed_sums(
    contribution_BGTE: torch.Tensor, alpha_BGT: torch.Tensor, window: int
) -> torch.Tensor:
    """Per token, the sum of its own contribution and those of the merge run before it,
    truncated to the last `window` tokens (the run's tokens t' < t with alpha = 1 after them)."""
    total_BGTE = contribution_BGTE
    decay_BGT = torch.ones_like(alpha_BGT)
    for offset in range(1, min(window, alpha_BGT.shape[-1])):
        decay_BGT = decay_BGT * _shift_time(alpha_BGT, offset - 1, time_dim=-1)
        total_BGTE = total_BGTE + decay_BGT[..., None] * _shift_time(
            contribution_BGTE, offset, time_dim=-2
        )
    return total_BGTE


def windowed_accumulation(
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    alpha_BGT: torch.Tensor,
    omega_BGT: torch.Tensor,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial accumulations ktilde, vtilde: the merge recurrence truncated to `window` tokens."""
    omega_BGT1 = omega_BGT[..., None]
    contribution_BGTE = torch.cat([omega_BGT1 * k_BGTD, omega_BGT1 * v_BGTD, omega_BGT1], -1)
    total_BGTE = windowed_sums(contribution_BGTE, alpha_BGT, window)
    kvtilde_BGT2D = total_BGTE[..., :-1] / total_BGTE[..., -1:]
    return kvtilde_BGT2D[..., : k_BGTD.shape[-1]], kvtilde_BGT2D[..., k_BGTD.shape[-1] :]


def attention_bias(alpha_BGT: torch.Tensor, first_B: torch.Tensor, hard: bool) -> torch.Tensor:
    """b_j from alpha_{j+1} (log(1 - alpha) relaxed, HARD_MASK_VALUE * alpha hard); padding
    keys before each row's first real token are masked."""
    next_alpha_BGT = F.pad(alpha_BGT[..., 1:], (0, 1))
    if hard:
        bias_BGT = HARD_MASK_VALUE * next_alpha_BGT
    else:
        bias_BGT = torch.log((1.0 - next_alpha_BGT).clamp_min(torch.finfo(alpha_BGT.dtype).tiny))
    padding_B1T = torch.arange(alpha_BGT.shape[2], device=alpha_BGT.device) < first_B[:, None, None]
    return bias_BGT.masked_fill(padding_B1T, HARD_MASK_VALUE)


def biased_causal_attention(
    q_BHTD: torch.Tensor,
    ktilde_BGTD: torch.Tensor,
    vtilde_BGTD: torch.Tensor,
    bias_BGT: torch.Tensor,
) -> torch.Tensor:
    """s_ij = q_i.k_j*scale + b_j for j < i, s_ii unbiased, through one causal SDPA call.

    The bias rides in an extra channel (q[D] = 1/scale, k_j[D] = b_j); the unbiased own slot
    becomes a "self" key placed first (q_i[D+1] = s_ii/scale, k_self[D+1] = 1) whose value is a
    one-hot channel, so that channel of the output is the own slot's weight.
    """
    group = q_BHTD.shape[1] // ktilde_BGTD.shape[1]
    value_dim = vtilde_BGTD.shape[-1]
    scale = q_BHTD.shape[-1] ** -0.5
    k_BHTD = ktilde_BGTD.repeat_interleave(group, 1)
    v_BHTD = vtilde_BGTD.repeat_interleave(group, 1)
    bias_BHT1 = bias_BGT.repeat_interleave(group, 1)[..., None]
    self_score_BHT1 = (q_BHTD * k_BHTD).sum(-1, keepdim=True) * scale
    q_aug = torch.cat(
        [q_BHTD, torch.full_like(self_score_BHT1, 1.0 / scale), self_score_BHT1 / scale], -1
    )
    k_aug = torch.cat([k_BHTD, bias_BHT1, torch.zeros_like(bias_BHT1)], dim=-1)
    k_self = F.pad(torch.ones_like(k_aug[:, :, :1, :1]), (k_aug.shape[-1] - 1, 0))
    v_aug = F.pad(v_BHTD, (0, 1))
    v_self = F.pad(torch.ones_like(v_aug[:, :, :1, :1]), (value_dim, 0))
    keys_BHTA = torch.cat([k_self, k_aug[:, :, :-1]], dim=2)
    values_BHTF = torch.cat([v_self, v_aug[:, :, :-1]], dim=2)
    out_BHTF = F.scaled_dot_product_attention(
        q_aug, keys_BHTA, values_BHTF, is_causal=True, scale=scale
    )
    return out_BHTF[..., :value_dim] + out_BHTF[..., value_dim:] * v_BHTD


@dataclass
class ParallelDMC:
    """One layer's parallel-form DMC attention and what the compressed cache is built from."""

    out_BHTD: torch.Tensor
    alpha_BGT: torch.Tensor
    omega_BGT: torch.Tensor
    k_BGTD: torch.Tensor
    """Pre-RoPE keys with channel D-1 zeroed."""
    v_BGTD: torch.Tensor
    k_rot_BGTD: torch.Tensor
    """Partial accumulations, rotated at their own (newest) position, channel D-1 zeroed."""
    vtilde_BGTD: torch.Tensor


def dmc_parallel_attention(
    q_BHTD: torch.Tensor,
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    cos_B1TD: torch.Tensor,
    sin_B1TD: torch.Tensor,
    config: LlamaDMCConfig,
    training: bool = False,
    first_B: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ParallelDMC:
    """Eval: hard decisions (Algorithm 1 exactly). Training: Gumbel-sigmoid relaxation."""
    if first_B is None:
        first_B = torch.zeros(q_BHTD.shape[0], dtype=torch.long, device=q_BHTD.device)
    temperature = config.dmc_temperature if training else None
    alpha_BGT = merge_decisions(k_BGTD, first_B, config.dmc_init_val, temperature, generator)
    omega_BGT = importance_weights(q_BHTD, k_BGTD.shape[1], config.dmc_init_val)
    k_BGTD = zero_decision_channel(k_BGTD)
    ktilde_BGTD, vtilde_BGTD = windowed_accumulation(
        k_BGTD, v_BGTD, alpha_BGT, omega_BGT, config.dmc_window_size
    )
    q_rot_BHTD = rope_without_decision_channel(q_BHTD, cos_B1TD, sin_B1TD)
    k_rot_BGTD = rope_without_decision_channel(ktilde_BGTD, cos_B1TD, sin_B1TD)
    bias_BGT = attention_bias(alpha_BGT, first_B, hard=not training)
    out_BHTD = biased_causal_attention(q_rot_BHTD, k_rot_BGTD, vtilde_BGTD, bias_BGT)
    return ParallelDMC(out_BHTD, alpha_BGT, omega_BGT, k_BGTD, v_BGTD, k_rot_BGTD, vtilde_BGTD)


# ----------------------------------------------------------------------------------------------
# The compressed cache: ragged per (sequence, KV head), paged, the open slot's window state
# ----------------------------------------------------------------------------------------------


def _ceil_div(x: torch.Tensor, divisor: int) -> torch.Tensor:
    return (x + divisor - 1) // divisor


def _storage_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


class PagedSlots:
    """The kept K/V slots of one layer: N rows (sequence, KV head) of different lengths.

    Slots live in pages of `page_size` from one pool per layer; row n owns
    ceil(length_n / page_size) pages, listed in its block-table row. The first write (prefill)
    sizes the pool exactly; later, when rows need pages and the pool is full, it is
    reallocated to at least PAGE_GROWTH times its capacity. Rows never shrink (a merge
    overwrites the last slot).
    """

    def __init__(
        self, rows: int, key_dim: int, value_dim: int, page_size: int, like: torch.Tensor
    ) -> None:
        """Empty rows; the pool takes the dtype and device of `like`."""
        self.page_size = page_size
        self.lengths_N = torch.zeros(rows, dtype=torch.long, device=like.device)
        self.used_pages = 0
        self.keys_PSD = like.new_zeros(0, page_size, key_dim)
        self.values_PSD = like.new_zeros(0, page_size, value_dim)
        self.pages_NM = torch.full((rows, 0), -1, dtype=torch.long, device=like.device)

    def extend(
        self,
        kept_NT: torch.Tensor,
        keys_NTD: torch.Tensor,
        values_NTD: torch.Tensor,
        continues_last_N: torch.Tensor,
    ) -> None:
        """Write the kept tokens' slots in order; a row whose first new token merges into its
        open slot (continues_last) overwrites its last slot, the other rows append."""
        base_N = self.lengths_N - continues_last_N.long()
        slots_NT = base_N[:, None] + kept_NT.long().cumsum(1) - 1
        new_lengths_N = base_N + kept_NT.sum(1)
        self._reserve(new_lengths_N)
        self.lengths_N = new_lengths_N
        rows_n, times_n = kept_NT.nonzero(as_tuple=True)
        pages_n = self.pages_NM[rows_n, slots_NT[rows_n, times_n] // self.page_size]
        offsets_n = slots_NT[rows_n, times_n] % self.page_size
        self.keys_PSD[pages_n, offsets_n] = keys_NTD[rows_n, times_n]
        self.values_PSD[pages_n, offsets_n] = values_NTD[rows_n, times_n]

    def step(self, append_N: torch.Tensor, keys_ND: torch.Tensor, values_ND: torch.Tensor) -> None:
        """One token per row: append rows open a new slot, the others overwrite their last."""
        kept_N1 = torch.ones_like(append_N)[:, None]
        self.extend(kept_N1, keys_ND[:, None], values_ND[:, None], ~append_N)

    def _reserve(self, new_lengths_N: torch.Tensor) -> None:
        old_pages_N = _ceil_div(self.lengths_N, self.page_size)
        count_N = _ceil_div(new_lengths_N, self.page_size) - old_pages_N
        count = int(count_N.sum())
        if count == 0:
            return
        missing_columns = int((old_pages_N + count_N).max()) - self.pages_NM.shape[1]
        if missing_columns > 0:
            self.pages_NM = F.pad(self.pages_NM, (0, missing_columns), value=-1)
        self._grow_pool(self.used_pages + count)
        rows_n = torch.repeat_interleave(torch.arange(len(count_N), device=count_N.device), count_N)
        new_n = torch.arange(count, device=count_N.device)
        first_new_N = count_N.cumsum(0) - count_N
        self.pages_NM[rows_n, old_pages_N[rows_n] + new_n - first_new_N[rows_n]] = (
            self.used_pages + new_n
        )
        self.used_pages += count

    def _grow_pool(self, needed: int) -> None:
        capacity = self.keys_PSD.shape[0]
        if needed <= capacity:
            return
        extra = max(needed, int(capacity * PAGE_GROWTH) + 1) - capacity
        self.keys_PSD = torch.cat(
            [self.keys_PSD, self.keys_PSD.new_zeros(extra, *self.keys_PSD.shape[1:])]
        )
        self.values_PSD = torch.cat(
            [self.values_PSD, self.values_PSD.new_zeros(extra, *self.values_PSD.shape[1:])]
        )

    def gather(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys [N, L, D], values [N, L, D] and validity [N, L], padded to the longest row."""
        num_pages = int(_ceil_div(self.lengths_N.max(), self.page_size))
        pages_NM = self.pages_NM[:, :num_pages].clamp_min(0)
        keys_NLD = self.keys_PSD[pages_NM].flatten(1, 2)
        values_NLD = self.values_PSD[pages_NM].flatten(1, 2)
        valid_NL = torch.arange(keys_NLD.shape[1], device=keys_NLD.device) < self.lengths_N[:, None]
        return keys_NLD, values_NLD, valid_NL

    def allocated_bytes(self) -> int:
        return _storage_bytes(self.keys_PSD, self.values_PSD, self.pages_NM, self.lengths_N)


class OpenSlotWindow:
    """Per row, the last `window` contributions (w*k, w*v, w) of the open slot's merge run, in a
    ring indexed by (position in the run) mod window. The merged key and value are the ring's
    sums divided by its weight: the release's running sums, recomputed so that no subtraction
    error accumulates over long runs."""

    def __init__(self, run_N: torch.Tensor, tail_NKE: torch.Tensor, window: int) -> None:
        """run_N: tokens in each row's open run; tail_NKE: the last K contributions, in order."""
        self.window = window
        self._refill(run_N, tail_NKE)

    def _refill(self, run_N: torch.Tensor, tail_NKE: torch.Tensor) -> None:
        window, tail = self.window, tail_NKE.shape[1]
        self.run_N = run_N
        self.ring_NWE = tail_NKE.new_zeros(tail_NKE.shape[0], window, tail_NKE.shape[-1])
        offset_O = torch.arange(min(window, tail), device=run_N.device)
        rows_n, offsets_n = (offset_O < run_N[:, None]).nonzero(as_tuple=True)
        run_index_n = run_N[rows_n] - 1 - offsets_n
        self.ring_NWE[rows_n, run_index_n % window] = tail_NKE[rows_n, tail - 1 - offsets_n]

    def step(self, append_N: torch.Tensor, contribution_NE: torch.Tensor) -> torch.Tensor:
        """Add one token; returns the open slot's merged (k, v), [N, E - 1], pre-RoPE."""
        self.ring_NWE = self.ring_NWE.masked_fill(append_N[:, None, None], 0.0)
        index_N = torch.where(append_N, 0, self.run_N % self.window)
        self.ring_NWE[torch.arange(len(index_N), device=index_N.device), index_N] = contribution_NE
        self.run_N = torch.where(append_N, 1, self.run_N + 1)
        total_NE = self.ring_NWE.sum(1)
        return total_NE[:, :-1] / total_NE[:, -1:]

    def history(self) -> torch.Tensor:
        """The open run's last `window` contributions in time order, zeros before it, [N, W, E]."""
        offset_W = torch.arange(self.window - 1, -1, -1, device=self.run_N.device)
        index_NW = (self.run_N[:, None] - 1 - offset_W) % self.window
        held_NW1 = (offset_W < self.run_N[:, None])[..., None]
        gathered_NWE = self.ring_NWE.gather(1, index_NW[..., None].expand_as(self.ring_NWE))
        return gathered_NWE * held_NW1

    def extend(self, alpha_NT: torch.Tensor, contribution_NTE: torch.Tensor) -> torch.Tensor:
        """Add T tokens at once (the parallel form continued from the open run); returns each
        token's merged (k, v), [N, T, E - 1], pre-RoPE."""
        n, length = alpha_NT.shape
        held_NWE = self.history()
        sequence_NUE = torch.cat([held_NWE, contribution_NTE], dim=1)
        alpha_NU = torch.cat([alpha_NT.new_ones(n, self.window), alpha_NT], dim=1)
        total_NTE = windowed_sums(sequence_NUE, alpha_NU, self.window)[:, self.window :]
        time_T = torch.arange(length, device=alpha_NT.device)
        last_append_N = torch.where(alpha_NT == 0, time_T, -1).amax(1)
        run_N = torch.where(last_append_N >= 0, length - last_append_N, self.run_N + length)
        self._refill(run_N, sequence_NUE[:, -self.window :])
        return total_NTE[..., :-1] / total_NTE[..., -1:]

    def allocated_bytes(self) -> int:
        return _storage_bytes(self.ring_NWE, self.run_N)


def attend_slots(
    q_rot_BHTD: torch.Tensor,
    keys_BGCD: torch.Tensor,
    values_BGCD: torch.Tensor,
    visible_BGTC: torch.Tensor,
) -> torch.Tensor:
    """Each query over the slots of its KV head (already rotated) it may see. [B, H, T, D].

    The R query heads of a KV head are stacked along time (X = R*T) so that one SDPA call
    serves the whole group without repeating its keys."""
    b, h, t, d = q_rot_BHTD.shape
    g, keys = keys_BGCD.shape[1], keys_BGCD.shape[2]
    q_BGXD = q_rot_BHTD.reshape(b, g, -1, d)
    visible_BGXC = visible_BGTC[:, :, None].expand(b, g, h // g, t, keys).reshape(b, g, -1, keys)
    out_BGXD = F.scaled_dot_product_attention(q_BGXD, keys_BGCD, values_BGCD, visible_BGXC)
    return out_BGXD.view(b, h, t, -1)


def chunk_visibility(
    valid_NL: torch.Tensor, lengths_N: torch.Tensor, alpha_NT: torch.Tensor
) -> torch.Tensor:
    """Which keys each new token sees, [N, T, C]: the cached slots (the last one unless the
    first new token merges into it), then the new tokens' partial slots under the DMC mask
    (its own, and every earlier one that the next token does not merge into)."""
    length = alpha_NT.shape[1]
    last_NL = torch.arange(valid_NL.shape[1], device=valid_NL.device) == lengths_N[:, None] - 1
    cached_NL = valid_NL & ~(last_NL & alpha_NT[:, :1].bool())
    next_append_NT = F.pad(alpha_NT[:, 1:] == 0, (0, 1), value=True)
    time_T = torch.arange(length, device=alpha_NT.device)
    earlier_TT = time_T[None, :] < time_T[:, None]
    new_NTT = (earlier_TT & next_append_NT[:, None, :]) | torch.eye(
        length, dtype=torch.bool, device=alpha_NT.device
    )
    return torch.cat([cached_NL[:, None].expand(-1, length, -1), new_NTT], dim=2)


class DMCCacheLayer(CacheLayerMixin):
    """One layer of the compressed cache, written by `DMCLlamaAttention` (not by `update`)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, config: LlamaDMCConfig, page_size: int) -> None:
        super().__init__()
        self.config, self.page_size = config, page_size
        self.slots: PagedSlots | None = None
        self.open_slot: OpenSlotWindow | None = None
        self.first_B: torch.Tensor | None = None
        self.tokens_seen = 0

    def prefill(self, parallel: ParallelDMC, first_B: torch.Tensor) -> None:
        """Build the compressed cache directly from one parallel pass over the prompt."""
        b, g, length, d = parallel.k_rot_BGTD.shape
        alpha_NT = parallel.alpha_BGT.reshape(b * g, length)
        first_N = first_B.repeat_interleave(g)
        time_T = torch.arange(length, device=first_N.device)
        kept_NT = (F.pad(alpha_NT[:, 1:], (0, 1)) == 0) & (time_T >= first_N[:, None])
        value_dim = parallel.vtilde_BGTD.shape[-1]
        self.slots = PagedSlots(b * g, d, value_dim, self.page_size, parallel.k_rot_BGTD)
        self.slots.extend(
            kept_NT,
            parallel.k_rot_BGTD.reshape(b * g, length, d),
            parallel.vtilde_BGTD.reshape(b * g, length, -1),
            torch.zeros_like(first_N, dtype=torch.bool),
        )
        tail = min(self.config.dmc_window_size, length)
        omega_NK1 = parallel.omega_BGT[..., -tail:].reshape(b * g, tail, 1)
        k_NKD = parallel.k_BGTD[:, :, -tail:].reshape(b * g, tail, d)
        v_NKD = parallel.v_BGTD[:, :, -tail:].reshape(b * g, tail, -1)
        tail_NKE = torch.cat([omega_NK1 * k_NKD, omega_NK1 * v_NKD, omega_NK1], dim=-1)
        appends_NT = (alpha_NT == 0) & (time_T >= first_N[:, None])
        run_N = length - torch.where(appends_NT, time_T, -1).amax(1)
        self.open_slot = OpenSlotWindow(run_N, tail_NKE, self.config.dmc_window_size)
        self.first_B, self.tokens_seen, self.is_initialized = first_B, length, True

    def _contributions(self, q_BHTD, k_BGTD, v_BGTD) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard decisions alpha [N, T] and window contributions (w*k, w*v, w) [N, T, E]."""
        (b, g, length, d), init_value = k_BGTD.shape, self.config.dmc_init_val
        alpha_NT = (k_BGTD[..., -1] - init_value > 0).to(k_BGTD.dtype).reshape(b * g, length)
        omega_NT1 = importance_weights(q_BHTD, g, init_value).reshape(b * g, length, 1)
        k_NTD = zero_decision_channel(k_BGTD).reshape(b * g, length, d)
        v_NTD = v_BGTD.reshape(b * g, length, -1)
        return alpha_NT, torch.cat([omega_NT1 * k_NTD, omega_NT1 * v_NTD, omega_NT1], -1)

    def decode(self, q_BHD, k_BGD, v_BGD, cos_BD, sin_BD) -> torch.Tensor:
        """Algorithm 1 for one token of every row, then attention over the slots. [B, H, D]."""
        (b, g, d), n = k_BGD.shape, k_BGD.shape[0] * k_BGD.shape[1]
        alpha_N1, contribution_N1E = self._contributions(
            q_BHD[:, :, None], k_BGD[:, :, None], v_BGD[:, :, None]
        )
        append_N = alpha_N1[:, 0] == 0
        merged_NE = self.open_slot.step(append_N, contribution_N1E[:, 0])
        k_rot_BGD = rope_without_decision_channel(
            merged_NE[:, :d].view(b, g, d), cos_BD[:, None], sin_BD[:, None]
        )
        self.slots.step(append_N, k_rot_BGD.reshape(n, d), merged_NE[:, d:])
        self.tokens_seen += 1
        keys_NLD, values_NLD, valid_NL = self.slots.gather()
        q_rot_BHD = rope_without_decision_channel(q_BHD, cos_BD[:, None], sin_BD[:, None])
        length = valid_NL.shape[1]
        return attend_slots(
            q_rot_BHD[:, :, None],
            keys_NLD.view(b, g, length, d),
            values_NLD.view(b, g, length, -1),
            valid_NL.view(b, g, 1, length),
        )[:, :, 0]

    def extend(self, q_BHTD, k_BGTD, v_BGTD, cos_BTD, sin_BTD) -> torch.Tensor:
        """Several tokens of every row in one pass: the parallel form continued from the cache
        (hard decisions, so Algorithm 1 token by token gives the same slots). [B, H, T, D]."""
        (b, g, length, d), n = k_BGTD.shape, k_BGTD.shape[0] * k_BGTD.shape[1]
        alpha_NT, contribution_NTE = self._contributions(q_BHTD, k_BGTD, v_BGTD)
        merged_NTE = self.open_slot.extend(alpha_NT, contribution_NTE)
        k_rot_NTD = rope_without_decision_channel(
            merged_NTE[..., :d].view(b, g, length, d), cos_BTD[:, None], sin_BTD[:, None]
        ).reshape(n, length, d)
        vtilde_NTD = merged_NTE[..., d:]
        keys_NLD, values_NLD, valid_NL = self.slots.gather()
        visible_NTC = chunk_visibility(valid_NL, self.slots.lengths_N, alpha_NT)
        keys_NCD = torch.cat([keys_NLD, k_rot_NTD], dim=1)
        values_NCD = torch.cat([values_NLD, vtilde_NTD], dim=1)
        next_append_NT = F.pad(alpha_NT[:, 1:] == 0, (0, 1), value=True)
        self.slots.extend(next_append_NT, k_rot_NTD, vtilde_NTD, alpha_NT[:, 0] == 1)
        self.tokens_seen += length
        q_rot_BHTD = rope_without_decision_channel(q_BHTD, cos_BTD[:, None], sin_BTD[:, None])
        keys = keys_NCD.shape[1]
        return attend_slots(
            q_rot_BHTD,
            keys_NCD.view(b, g, keys, d),
            values_NCD.view(b, g, keys, -1),
            visible_NTC.view(b, g, length, keys),
        )

    def slot_counts(self) -> torch.Tensor:
        """Kept slots per (sequence, KV head), [B, G]."""
        return self.slots.lengths_N.view(len(self.first_B), -1)

    def allocated_bytes(self) -> int:
        if self.slots is None:
            return 0
        return (
            self.slots.allocated_bytes()
            + self.open_slot.allocated_bytes()
            + _storage_bytes(self.first_B)
        )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate ahead: prefill sizes the cache from the decisions."""

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "a DMC cache layer is written by DMCLlamaAttention (prefill + Algorithm 1), "
            "not through Cache.update; use it only with DMCLlamaForCausalLM"
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.tokens_seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.tokens_seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.slots = self.open_slot = self.first_B = None
        self.tokens_seen, self.is_initialized = 0, False

    def _unsupported(self, *args, **kwargs) -> None:
        raise ValueError(
            "the DMC cache cannot be cropped, reordered or re-batched (beam search, assisted or "
            "contrastive decoding); use greedy or sampling generation with num_beams=1"
        )

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported
    offload = prefetch = _unsupported


class DMCCache(Cache):
    """The ragged compressed KV cache of a DMC Llama, one `DMCCacheLayer` per layer.

    Every (layer, sequence, KV head) keeps only its own slots (no padding to other heads'
    lengths) in pages of `page_size` slots, plus the open slot's window state.
    """

    def __init__(self, config: LlamaDMCConfig, page_size: int = 16) -> None:
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(
                f"page_size must be a positive integer (slots per page); got {page_size!r}"
            )
        layers = [DMCCacheLayer(config, page_size) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)

    def slot_counts(self) -> torch.Tensor:
        """Kept slots per (layer, sequence, KV head), [layers, B, G]."""
        return torch.stack([layer.slot_counts() for layer in self.layers])

    def real_tokens(self) -> torch.Tensor:
        """Tokens seen per sequence, padding excluded, [B]."""
        layer = self.layers[0]
        return layer.tokens_seen - layer.first_B

    def compression_ratio(self) -> float:
        """Tokens seen / slots kept over all layers, sequences and KV heads."""
        counts_LBG = self.slot_counts()
        tokens = self.real_tokens()[None, :, None].expand_as(counts_LBG)
        return float(tokens.sum() / counts_LBG.sum())

    def allocated_bytes(self) -> int:
        """Bytes held now: slot pages, block tables, lengths and window state of every layer."""
        return sum(layer.allocated_bytes() for layer in self.layers)

    def dense_bytes(self) -> int:
        """What an uncompressed K/V cache of the same real tokens would hold."""
        pool = self.layers[0].slots
        per_slot = (
            pool.keys_PSD.shape[-1] + pool.values_PSD.shape[-1]
        ) * pool.keys_PSD.element_size()
        rows_per_sequence = self.slot_counts().shape[-1]
        return int(self.real_tokens().sum()) * rows_per_sequence * per_slot * len(self.layers)


# ----------------------------------------------------------------------------------------------
# The model: transformers' Llama with its attention replaced (weights keep Llama names)
# ----------------------------------------------------------------------------------------------


class DMCLlamaAttention(LlamaAttention):
    """Llama attention with DMC: parallel form without a cache; with a `DMCCache`, parallel
    prefill into the compressed cache, then Algorithm 1 one token at a time."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: DMCCache | None = None,
        dmc_first_token: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """dmc_first_token: [B] index of each row's first real token (left padding) or None."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q_BHTD = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k_BGTD = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v_BGTD = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos_BTD, sin_BTD = position_embeddings
        if dmc_first_token is None:
            dmc_first_token = torch.zeros(q_BHTD.shape[0], dtype=torch.long, device=q_BHTD.device)
        if cache is None:
            out_BHTD = dmc_parallel_attention(
                q_BHTD,
                k_BGTD,
                v_BGTD,
                cos_BTD[:, None],
                sin_BTD[:, None],
                self.config,
                self.training,
                dmc_first_token,
            ).out_BHTD
        else:
            layer = cache.layers[self.layer_idx]
            out_BHTD = self._cached(
                layer, q_BHTD, k_BGTD, v_BGTD, cos_BTD, sin_BTD, dmc_first_token
            )
        out_BTX = out_BHTD.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(out_BTX), None

    def _cached(self, layer: DMCCacheLayer, q_BHTD, k_BGTD, v_BGTD, cos_BTD, sin_BTD, first_B):
        if layer.tokens_seen == 0:
            parallel = dmc_parallel_attention(
                q_BHTD,
                k_BGTD,
                v_BGTD,
                cos_BTD[:, None],
                sin_BTD[:, None],
                self.config,
                False,
                first_B,
            )
            layer.prefill(parallel, first_B)
            return parallel.out_BHTD
        if q_BHTD.shape[2] > 1:
            return layer.extend(q_BHTD, k_BGTD, v_BGTD, cos_BTD, sin_BTD)
        out_BHD = layer.decode(
            q_BHTD[:, :, 0], k_BGTD[:, :, 0], v_BGTD[:, :, 0], cos_BTD[:, 0], sin_BTD[:, 0]
        )
        return out_BHD[:, :, None]


def first_real_tokens(
    attention_mask: torch.Tensor | None, batch: int, length: int, past: int, cached: bool
) -> torch.Tensor | None:
    """Each row's first real token from a 2D 0/1 mask [B, past + T]; None when unpadded."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, past + length):
        raise ValueError(
            "DMC models take a 2D 0/1 attention_mask of shape [batch, past + new tokens] = "
            f"{(batch, past + length)} (padding on the left); got shape {tuple(attention_mask.shape)}"
        )
    real_BT = attention_mask[:, past:].bool()
    if past > 0:
        if not real_BT.all():
            raise ValueError("padding is only allowed in the first forward (the prompt) of a cache")
        return None
    first_B, count_B = real_BT.int().argmax(1), real_BT.sum(1)
    time_T = torch.arange(length, device=real_BT.device)
    contiguous_BT = (time_T >= first_B[:, None]) & (time_T < (first_B + count_B)[:, None])
    if not torch.equal(contiguous_BT, real_BT) or (count_B == 0).any():
        raise ValueError(
            "each row of attention_mask must be zeros then ones (left padding), optionally "
            "followed by zeros when no cache is used, with at least one real token"
        )
    if cached and ((first_B + count_B) != length).any():
        raise ValueError(
            "the DMC cache supports left padding only: pad prompts on the left "
            "(tokenizer.padding_side = 'left') or pass use_cache=False"
        )
    return first_B if bool((first_B > 0).any()) else None


def resolve_cache(
    cache, use_cache: bool | None, config: LlamaDMCConfig, training: bool
) -> DMCCache | None:
    if cache is not None and not isinstance(cache, DMCCache):
        raise ValueError(
            f"DMC models need a DMCCache (the ragged compressed cache), got {type(cache).__name__}; "
            "leave cache unset or pass DMCCache(model.config)"
        )
    if cache is not None and training:
        raise ValueError(
            "the DMC cache needs hard decisions: call model.eval() before using a cache"
        )
    if cache is None and use_cache and not training:
        cache = DMCCache(config)
    return cache


class _DMCBackendFlags:
    """DMC attention runs its own SDPA call: no other attention backend, no compiled cache."""

    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False
    _can_record_outputs: ClassVar[dict] = {"hidden_states": LlamaDecoderLayer}


class DMCLlamaModel(_DMCBackendFlags, LlamaModel):
    config_class = LlamaDMCConfig

    def __init__(self, config: LlamaDMCConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList()
        for layer_idx in range(config.num_hidden_layers):
            layer = LlamaDecoderLayer(config, layer_idx)
            layer.self_attn = DMCLlamaAttention(config, layer_idx)
            self.layers.append(layer)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DMCCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        cache = resolve_cache(cache, use_cache, self.config, self.training)
        batch, length = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        first_B = first_real_tokens(attention_mask, batch, length, past, cache is not None)
        if position_ids is None:
            position_ids = (torch.arange(length, device=inputs_embeds.device) + past)[None]
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden_states = inputs_embeds
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                dmc_first_token=first_B,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


GENERATION_MODES = ("greedy_search", "sample")


class DMCLlamaForCausalLM(_DMCBackendFlags, LlamaForCausalLM):
    config_class = LlamaDMCConfig

    def __init__(self, config: LlamaDMCConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.model = DMCLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, *args, **kwargs
    ):
        mode = getattr(generation_mode, "value", generation_mode)
        if mode not in GENERATION_MODES or generation_config.cache_implementation is not None:
            raise ValueError(
                f"DMC generation supports greedy search and sampling with its own DMCCache; got mode "
                f"{mode!r}, cache_implementation={generation_config.cache_implementation!r}. Use "
                "num_beams=1, no assistant model, and leave cache_implementation unset"
            )
        if model_kwargs.get("cache") is None and generation_config.use_cache:
            model_kwargs["cache"] = DMCCache(self.config)
        return super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, *args, **kwargs
        )


__all__ = [
    "DMCCache",
    "DMCCacheLayer",
    "DMCLlamaAttention",
    "DMCLlamaForCausalLM",
    "DMCLlamaModel",
    "dmc_parallel_attention",
]
