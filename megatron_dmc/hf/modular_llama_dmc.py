"""Llama with Dynamic Memory Compression (DMC) for transformers, and its compressed KV cache.

Its source is `modular_llama_dmc.py`, which imports the DMC maths from `megatron_dmc.ops`
and the cache's page pool and window state from `megatron_dmc.inference`;
`tools/generate_hf_modeling.py` writes `modeling_llama_dmc.py` from it with those definitions
inlined, so that an exported checkpoint loads with `trust_remote_code=True` where
megatron_dmc is not installed.

Legend (docs/shapes.md): B batch, C hidden size, H query heads, G KV heads, R = H/G, T time,
D head dim, W window, Y merge delay, U = B*G cache streams (one per sequence and KV head), S
slots a stream holds, P pages, N slots per page, M pages per stream, K tokens leaving the
exact window in a call; file-local: A = Y' + T exact tokens a call's queries may see (Y' <= Y
held before it), J = S + K compressed keys they may see, X = R*T stacked queries of a KV
head, E = H*D concatenated heads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.initialization import zeros_
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

from megatron_dmc.inference.pool import PagePool
from megatron_dmc.inference.window import (
    WindowState,
    chronological,
    merge_step,
    state_after_chunk,
)
from megatron_dmc.ops.accumulate import windowed_partial_accumulation
from megatron_dmc.ops.attention import HARD_MASK_VALUE, attention_bias, dmc_attention
from megatron_dmc.ops.config import DMCConfig
from megatron_dmc.ops.forward import (
    key_for_accumulation,
    make_decisions,
    resolve_decision_logits,
    rope_for_attention,
    rope_for_query,
    slot_keys_values,
)
from megatron_dmc.ops.heads import DecisionLogits, decision_head_logits, importance_from_logits
from megatron_dmc.ops.relaxation import eval_decisions

from .configuration_llama_dmc import LlamaDMCConfig

# ----------------------------------------------------------------------------------------------
# The parallel form: megatron_dmc.ops, plus left padding (each row's first real token appends,
# padding keys are masked)
# ----------------------------------------------------------------------------------------------


def ops_config(config: LlamaDMCConfig) -> DMCConfig:
    """The ops hyper-parameters of a transformers config."""
    return DMCConfig(
        window_size=config.dmc_window_size,
        init_val=float(config.dmc_init_val),
        temperature=float(config.dmc_temperature),
        decision_source=config.dmc_decision_source,
        merge_delay=config.dmc_merge_delay,
        kv_method=config.dmc_kv_method,
        decision_threshold=float(config.dmc_decision_threshold),
    )


class DMCDecisionProjection(nn.Module):
    """The decision heads of one layer: the attention input -> alpha and omega logits per KV
    head (`ops.decision_head_logits`). Zero-initialised, so a new model is the original."""

    def __init__(self, hidden_size: int, num_kv_heads: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2 * num_kv_heads, hidden_size))

    def forward(self, x_BTC: torch.Tensor, init_val: float) -> DecisionLogits:
        return decision_head_logits(x_BTC, self.weight, init_val)


@dataclass
class ParallelDMC:
    """One layer's parallel-form DMC attention and what the compressed cache is built from."""

    out_BHTD: torch.Tensor
    alpha_BGT: torch.Tensor
    omega_BGT: torch.Tensor
    k_BGTD: torch.Tensor
    """Pre-RoPE keys as they enter the slots (channel D-1 zeroed in channel mode)."""
    v_BGTD: torch.Tensor
    k_rot_BGTD: torch.Tensor
    """Partial accumulations, rotated at their own (newest) position."""
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
    logits: DecisionLogits | None = None,
) -> ParallelDMC:
    """`ops.dmc_self_attention` with left padding: each row's first real token (first_B, [B];
    None: no padding) appends and the padding keys are masked. Eval: hard decisions
    (Algorithm 1 exactly); training: the Gumbel-sigmoid relaxation. `logits` as for
    `ops.make_decisions` (required in heads mode)."""
    batch, length = q_BHTD.shape[0], q_BHTD.shape[2]
    if first_B is None:
        first_B = torch.zeros(batch, dtype=torch.long, device=q_BHTD.device)
    dmc = ops_config(config)
    decisions = make_decisions(q_BHTD, k_BGTD, dmc, training, generator, logits=logits)
    time_T = torch.arange(length, device=q_BHTD.device)
    alpha_BGT = decisions.alpha_BGT.masked_fill(time_T == first_B[:, None, None], 0.0)
    k_in_BGTD = key_for_accumulation(k_BGTD, dmc)
    ktilde_BGTD, vtilde_BGTD = slot_keys_values(
        k_in_BGTD, v_BGTD, alpha_BGT, decisions.omega_BGT, dmc
    )
    k_rot_BGTD = rope_for_attention(ktilde_BGTD, cos_B1TD, sin_B1TD, dmc)
    bias_BGT = attention_bias(alpha_BGT, hard=not training).masked_fill(
        time_T < first_B[:, None, None], HARD_MASK_VALUE
    )
    exact = {}
    if dmc.merge_delay:
        k_exact_BGTD = rope_for_attention(k_in_BGTD, cos_B1TD, sin_B1TD, dmc)
        exact = dict(k_BGTD=k_exact_BGTD, v_BGTD=v_BGTD, merge_delay=dmc.merge_delay)
    q_rot_BHTD = rope_for_query(q_BHTD, cos_B1TD, sin_B1TD, dmc, k_BGTD.shape[1])
    out_BHTD = dmc_attention(q_rot_BHTD, k_rot_BGTD, vtilde_BGTD, bias_BGT, **exact)
    omega_BGT = decisions.omega_BGT
    return ParallelDMC(out_BHTD, alpha_BGT, omega_BGT, k_in_BGTD, v_BGTD, k_rot_BGTD, vtilde_BGTD)


# ----------------------------------------------------------------------------------------------
# The compressed cache: ragged per (sequence, KV head), paged, the open slot's window state
# ----------------------------------------------------------------------------------------------


def _ceil_div(x: torch.Tensor, divisor: int) -> torch.Tensor:
    return (x + divisor - 1) // divisor


def _storage_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


class PagedSlots:
    """The kept K/V slots of one layer: U rows (streams: sequence, KV head) of different lengths.

    Slots live in pages of `page_size` from one growable `PagePool` per layer; a row owns
    ceil(its length / page_size) pages, listed in its block-table row. The first write
    (prefill) sizes the pool exactly; later, when rows need pages and the pool is full, the
    pool grows (doubles) in place. Rows never shrink (a merge overwrites the last slot).
    """

    def __init__(self, rows: int, head_dim: int, page_size: int, like: torch.Tensor) -> None:
        """Empty rows; the pool takes the dtype and device of `like`."""
        self.page_size, self.head_dim, self.like = page_size, head_dim, like.new_zeros(0)
        self.lengths_U = torch.zeros(rows, dtype=torch.long, device=like.device)
        self.pool: PagePool | None = None
        self.pages_UM = torch.full((rows, 0), -1, dtype=torch.long, device=like.device)

    @property
    def used_pages(self) -> int:
        return 0 if self.pool is None else self.pool.pages_in_use

    def extend(
        self,
        kept_UT: torch.Tensor,
        keys_UTD: torch.Tensor,
        values_UTD: torch.Tensor,
        continues_last_U: torch.Tensor,
    ) -> None:
        """Write the kept tokens' slots in order; a row whose first new token merges into its
        open slot (continues_last) overwrites its last slot, the other rows append."""
        base_U = self.lengths_U - continues_last_U.long()
        slots_UT = base_U[:, None] + kept_UT.long().cumsum(1) - 1
        new_lengths_U = base_U + kept_UT.sum(1)
        self._reserve(new_lengths_U)
        self.lengths_U = new_lengths_U
        if self.pool is None:  # nothing kept yet (a delayed stream's first tokens)
            return
        rows_K, times_K = kept_UT.nonzero(as_tuple=True)
        slots_K = slots_UT[rows_K, times_K]
        flat_K = self.pages_UM[rows_K, slots_K // self.page_size] * self.page_size
        flat_K = flat_K + slots_K % self.page_size
        self.pool.k_flat[flat_K] = keys_UTD[rows_K, times_K].to(self.pool.k_flat.dtype)
        self.pool.v_flat[flat_K] = values_UTD[rows_K, times_K].to(self.pool.v_flat.dtype)

    def step(self, append_U: torch.Tensor, keys_UD: torch.Tensor, values_UD: torch.Tensor) -> None:
        """One token per row: append rows open a new slot, the others overwrite their last."""
        kept_U1 = torch.ones_like(append_U)[:, None]
        self.extend(kept_U1, keys_UD[:, None], values_UD[:, None], ~append_U)

    def _reserve(self, new_lengths_U: torch.Tensor) -> None:
        old_pages_U = _ceil_div(self.lengths_U, self.page_size)
        count_U = _ceil_div(new_lengths_U, self.page_size) - old_pages_U
        count = int(count_U.sum())
        if count == 0:
            return
        missing_columns = int((old_pages_U + count_U).max()) - self.pages_UM.shape[1]
        if missing_columns > 0:
            self.pages_UM = F.pad(self.pages_UM, (0, missing_columns), value=-1)
        if self.pool is None:
            like = self.like
            self.pool = PagePool(
                count, self.page_size, self.head_dim, like.dtype, like.device, growable=True
            )
        rows_K = torch.repeat_interleave(torch.arange(len(count_U), device=count_U.device), count_U)
        new_K = torch.arange(count, device=count_U.device)
        first_new_U = count_U.cumsum(0) - count_U
        columns_K = old_pages_U[rows_K] + new_K - first_new_U[rows_K]
        self.pages_UM[rows_K, columns_K] = self.pool.allocate(count, "the DMC cache")

    def gather(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys [U, S, D], values [U, S, D] and validity [U, S], padded to the longest row."""
        if self.pool is None:
            empty_USD = self.like.new_zeros(len(self.lengths_U), 0, self.head_dim)
            return empty_USD, empty_USD, empty_USD[..., 0] != 0
        num_pages = int(_ceil_div(self.lengths_U.max(), self.page_size))
        pages_UM = self.pages_UM[:, :num_pages].clamp_min(0)
        keys_USD = self.pool.k_pages_PND[pages_UM].flatten(1, 2)
        values_USD = self.pool.v_pages_PND[pages_UM].flatten(1, 2)
        valid_US = torch.arange(keys_USD.shape[1], device=keys_USD.device) < self.lengths_U[:, None]
        return keys_USD, values_USD, valid_US

    def allocated_bytes(self) -> int:
        """Page storage, the pool's free-page stack, block table and lengths."""
        tables = _storage_bytes(self.pages_UM, self.lengths_U)
        if self.pool is None:
            return tables
        return tables + _storage_bytes(
            self.pool.k_pages_PND, self.pool.v_pages_PND, self.pool.free_P
        )


def empty_window(batch: int, groups: int, window: int, like: torch.Tensor) -> WindowState:
    """The window state of streams that hold no token yet."""
    k_BGWD = like.new_zeros(batch, groups, window, like.shape[-1])
    state_dtype = torch.promote_types(like.dtype, torch.float32)
    w_BGW = torch.zeros(batch, groups, window, dtype=state_dtype, device=like.device)
    run_len_BG = torch.zeros(batch, groups, dtype=torch.long, device=like.device)
    return WindowState(k_BGWD, torch.zeros_like(k_BGWD), w_BGW, run_len_BG)


def accumulate_after_window(
    window: WindowState,
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    alpha_BGT: torch.Tensor,
    omega_BGT: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial accumulations of T new tokens whose first run may continue the open run: the
    run's last W contributions go in front (oldest first, weight 0 where none), then are cut."""
    held = chronological(window)
    size, dtype = window.w_BGW.shape[-1], k_BGTD.dtype
    ktilde_BGTD, vtilde_BGTD = windowed_partial_accumulation(
        torch.cat([held.k_BGWD.to(dtype), k_BGTD], dim=2),
        torch.cat([held.v_BGWD.to(dtype), v_BGTD], dim=2),
        torch.cat([torch.ones_like(held.w_BGW, dtype=dtype), alpha_BGT], dim=2),
        torch.cat([held.w_BGW.to(dtype), omega_BGT], dim=2),
        size,
    )
    return ktilde_BGTD[:, :, size:], vtilde_BGTD[:, :, size:]


def attend_slots(
    q_rot_BHTD: torch.Tensor,
    keys_BGJD: torch.Tensor,
    values_BGJD: torch.Tensor,
    visible_BGTJ: torch.Tensor,
) -> torch.Tensor:
    """Each query over the slots of its KV head (already rotated) it may see. [B, H, T, D].

    The H/G query heads of a KV head are stacked along time (X = R*T) so that one SDPA
    call serves the whole group without repeating its keys."""
    b, h, t, d = q_rot_BHTD.shape
    g, keys = keys_BGJD.shape[1], keys_BGJD.shape[2]
    q_BGXD = q_rot_BHTD.reshape(b, g, -1, d)
    visible_BGXJ = visible_BGTJ[:, :, None].expand(b, g, h // g, t, keys).reshape(b, g, -1, keys)
    out_BGXD = F.scaled_dot_product_attention(q_BGXD, keys_BGJD, values_BGJD, visible_BGXJ)
    return out_BGXD.view(b, h, t, -1)


def chunk_visibility(
    valid_US: torch.Tensor, lengths_U: torch.Tensor, alpha_UT: torch.Tensor
) -> torch.Tensor:
    """Which keys each new token sees, [U, T, J]: the cached slots (the last one unless the
    first new token merges into it), then the new tokens' partial slots under the DMC mask
    (its own, and every earlier one that the next token does not merge into)."""
    length = alpha_UT.shape[1]
    last_US = torch.arange(valid_US.shape[1], device=valid_US.device) == lengths_U[:, None] - 1
    cached_US = valid_US & ~(last_US & alpha_UT[:, :1].bool())
    next_append_UT = F.pad(alpha_UT[:, 1:] == 0, (0, 1), value=True)
    time_T = torch.arange(length, device=alpha_UT.device)
    earlier_TT = time_T[None, :] < time_T[:, None]
    new_UTT = (earlier_TT & next_append_UT[:, None, :]) | torch.eye(
        length, dtype=torch.bool, device=alpha_UT.device
    )
    return torch.cat([cached_US[:, None].expand(-1, length, -1), new_UTT], dim=2)


def _time_dim(name: str) -> int:
    """The time dim of a tensor named with its shape suffix (`k_BGTD` -> 2)."""
    return name.rsplit("_", 1)[1].index("T")


@dataclass
class CallTokens:
    """Per-token tensors of tokens on their way into the compressed slots, in time order."""

    k_BGTD: torch.Tensor
    """Pre-RoPE keys as they enter the slots (`ops.key_for_accumulation`)."""
    v_BGTD: torch.Tensor
    alpha_BGT: torch.Tensor
    """Hard decisions: 1 merges the token into the open slot."""
    omega_BGT: torch.Tensor
    cos_BTD: torch.Tensor
    sin_BTD: torch.Tensor

    @property
    def length(self) -> int:
        return self.alpha_BGT.shape[-1]

    def _map(self, op) -> CallTokens:
        """op(tensor, time_dim) applied to every field."""
        return CallTokens(
            *(op(getattr(self, f.name), _time_dim(f.name)) for f in fields(CallTokens))
        )

    def split(self, count: int) -> tuple[CallTokens, CallTokens]:
        """The first `count` tokens (views) and a compact copy of the rest."""
        head = self._map(lambda x, dim: x.narrow(dim, 0, count))
        tail = self._map(lambda x, dim: x.narrow(dim, count, x.shape[dim] - count).clone())
        return head, tail

    def then(self, later: CallTokens) -> CallTokens:
        return CallTokens(
            *(
                torch.cat([getattr(self, f.name), getattr(later, f.name)], _time_dim(f.name))
                for f in fields(CallTokens)
            )
        )

    def allocated_bytes(self) -> int:
        return _storage_bytes(*(getattr(self, f.name) for f in fields(CallTokens)))


def exact_band(held: int, length: int, delay: int, device: torch.device) -> torch.Tensor:
    """[T, A]: which of the held exact tokens and the call's own each new token sees (the
    last `delay` tokens up to itself; `held` = Y' tokens precede the call)."""
    query_T1 = torch.arange(length, device=device)[:, None] + held
    key_1A = torch.arange(held + length, device=device)[None, :]
    return (key_1A <= query_T1) & (key_1A > query_T1 - delay)


class DMCCacheLayer(CacheLayerMixin):
    """One layer of the compressed cache, written by `DMCLlamaAttention` (not by `update`).

    With a merge delay Y, the last Y tokens of every stream wait in `exact` (attended
    exactly); a token goes through Algorithm 1 into the slots when it leaves them."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, config: LlamaDMCConfig, page_size: int) -> None:
        super().__init__()
        self.config, self.page_size, self.dmc = config, page_size, ops_config(config)
        self.slots: PagedSlots | None = None
        self.window: WindowState | None = None
        self.exact: CallTokens | None = None
        self.first_B: torch.Tensor | None = None
        self.tokens_seen = 0

    def prefill(self, parallel: ParallelDMC, first_B: torch.Tensor, cos_BTD, sin_BTD) -> None:
        """Build the compressed cache directly from one parallel pass over the prompt."""
        b, g, length, d = parallel.k_rot_BGTD.shape
        tokens = CallTokens(
            parallel.k_BGTD,
            parallel.v_BGTD,
            parallel.alpha_BGT,
            parallel.omega_BGT,
            cos_BTD.expand(b, -1, -1),
            sin_BTD.expand(b, -1, -1),
        )
        leaving, self.exact = tokens.split(max(length - self.dmc.merge_delay, 0))
        self.slots = PagedSlots(b * g, d, self.page_size, parallel.k_rot_BGTD)
        self.window = empty_window(b, g, self.dmc.window_size, parallel.k_BGTD)
        count = leaving.length
        if count:
            alpha_UT = leaving.alpha_BGT.reshape(b * g, count)
            time_T = torch.arange(count, device=first_B.device)
            real_UT = time_T >= first_B.repeat_interleave(g)[:, None]
            self.slots.extend(
                (F.pad(alpha_UT[:, 1:], (0, 1)) == 0) & real_UT,
                parallel.k_rot_BGTD[:, :, :count].reshape(b * g, count, d),
                parallel.vtilde_BGTD[:, :, :count].reshape(b * g, count, -1),
                torch.zeros_like(alpha_UT[:, 0], dtype=torch.bool),
            )
            self.window = self._window_after(self.window, leaving)
        self.first_B, self.tokens_seen, self.is_initialized = first_B, length, True

    def _window_after(self, window: WindowState, tokens: CallTokens) -> WindowState:
        """The window state after more tokens (a row's first real token appends)."""
        lengths_B = torch.full_like(tokens.alpha_BGT[:, 0, 0], tokens.length, dtype=torch.long)
        state = state_after_chunk(
            window,
            tokens.k_BGTD,
            tokens.v_BGTD,
            tokens.omega_BGT.to(window.w_BGW.dtype),
            tokens.alpha_BGT == 0,
            lengths_B,
        )
        compact = (t.contiguous() for t in (state.k_BGWD, state.v_BGWD, state.w_BGW))
        return WindowState(*compact, state.run_len_BG)

    def _call_tokens(self, q_BHTD, k_BGTD, v_BGTD, cos_BTD, sin_BTD, logits) -> CallTokens:
        """Hard decisions and importance of new tokens, with what the slots take from them."""
        logits = resolve_decision_logits(q_BHTD, k_BGTD, self.dmc, logits)
        b = k_BGTD.shape[0]
        return CallTokens(
            key_for_accumulation(k_BGTD, self.dmc),
            v_BGTD,
            eval_decisions(logits.alpha_BGT),
            importance_from_logits(logits.omega_BGT),
            cos_BTD.expand(b, -1, -1),
            sin_BTD.expand(b, -1, -1),
        )

    def decode(self, q_BHD, k_BGD, v_BGD, cos_BD, sin_BD, logits=None) -> torch.Tensor:
        """Algorithm 1 for one token of every row, then attention over the slots. [B, H, D]."""
        if self.dmc.merge_delay:
            args = (q_BHD[:, :, None], k_BGD[:, :, None], v_BGD[:, :, None])
            return self.extend(*args, cos_BD[:, None], sin_BD[:, None], logits)[:, :, 0]
        (b, g, d), u = k_BGD.shape, k_BGD.shape[0] * k_BGD.shape[1]
        new = self._call_tokens(
            q_BHD[:, :, None], k_BGD[:, :, None], v_BGD[:, :, None], cos_BD, sin_BD, logits
        )
        merge_BG = new.alpha_BGT[..., 0] == 1
        self.window, slot_k_BGD, slot_v_BGD = merge_step(
            self.window,
            new.k_BGTD[:, :, 0].to(self.window.k_BGWD.dtype),
            v_BGD.to(self.window.v_BGWD.dtype),
            new.omega_BGT[..., 0].to(self.window.w_BGW.dtype),
            merge_BG,
        )
        k_rot_BGD = rope_for_attention(slot_k_BGD, cos_BD[:, None], sin_BD[:, None], self.dmc)
        self.slots.step(~merge_BG.reshape(u), k_rot_BGD.reshape(u, d), slot_v_BGD.reshape(u, d))
        self.tokens_seen += 1
        keys_USD, values_USD, valid_US = self.slots.gather()
        q_rot_BHD = rope_for_query(q_BHD, cos_BD[:, None], sin_BD[:, None], self.dmc, g)
        length = valid_US.shape[1]
        return attend_slots(
            q_rot_BHD[:, :, None],
            keys_USD.view(b, g, length, d).to(q_BHD.dtype),
            values_USD.view(b, g, length, -1).to(q_BHD.dtype),
            valid_US.view(b, g, 1, length),
        )[:, :, 0]

    def extend(self, q_BHTD, k_BGTD, v_BGTD, cos_BTD, sin_BTD, logits=None) -> torch.Tensor:
        """Several tokens of every row in one pass: the parallel form continued from the cache
        (hard decisions, so Algorithm 1 token by token gives the same slots). [B, H, T, D]."""
        (b, g, length, d), delay = k_BGTD.shape, self.dmc.merge_delay
        new = self._call_tokens(q_BHTD, k_BGTD, v_BGTD, cos_BTD, sin_BTD, logits)
        held = self.exact.length
        tokens = self.exact.then(new)
        leaving, self.exact = tokens.split(max(tokens.length - delay, 0))
        keys_UJD, values_UJD, visible_UTJ = self._compressed_keys(leaving, length)
        if delay:
            k_exact_BGAD = rope_for_attention(
                tokens.k_BGTD, tokens.cos_BTD[:, None], tokens.sin_BTD[:, None], self.dmc
            )
            band_TA = exact_band(held, length, delay, k_BGTD.device)
            keys_UJD = torch.cat([keys_UJD, k_exact_BGAD.flatten(0, 1)], dim=1)
            values_UJD = torch.cat([values_UJD, tokens.v_BGTD.flatten(0, 1)], dim=1)
            band_UTA = band_TA[None].expand(b * g, -1, -1)
            visible_UTJ = torch.cat([visible_UTJ, band_UTA], dim=2)
        self.tokens_seen += length
        q_rot_BHTD = rope_for_query(q_BHTD, cos_BTD[:, None], sin_BTD[:, None], self.dmc, g)
        keys = keys_UJD.shape[1]
        return attend_slots(
            q_rot_BHTD,
            keys_UJD.view(b, g, keys, d).to(q_BHTD.dtype),
            values_UJD.view(b, g, keys, -1).to(q_BHTD.dtype),
            visible_UTJ.view(b, g, length, keys),
        )

    def _compressed_keys(self, leaving: CallTokens, length: int):
        """Write the K tokens leaving the exact window into the slots; returns the keys and
        values [U, J, D] the call's T queries may see there (cached slots, then the leaving
        tokens' partial slots) and which ones each sees, [U, T, J]. The last query sees the
        slots as they are after the last leaving token, query t those after leaving token
        t - T + K (none where that is negative: the sequence has no slot yet)."""
        b, g, count, _ = leaving.k_BGTD.shape
        keys_USD, values_USD, valid_US = self.slots.gather()
        if count == 0:
            return keys_USD, values_USD, valid_US.new_zeros(b * g, length, valid_US.shape[1])
        ktilde_BGTD, vtilde_BGTD = accumulate_after_window(
            self.window, leaving.k_BGTD, leaving.v_BGTD, leaving.alpha_BGT, leaving.omega_BGT
        )
        cos_B1TD, sin_B1TD = leaving.cos_BTD[:, None], leaving.sin_BTD[:, None]
        k_rot_UTD = rope_for_attention(ktilde_BGTD, cos_B1TD, sin_B1TD, self.dmc).flatten(0, 1)
        vtilde_UTD = vtilde_BGTD.flatten(0, 1)
        alpha_UT = leaving.alpha_BGT.flatten(0, 1)
        visible_UKJ = chunk_visibility(valid_US, self.slots.lengths_U, alpha_UT)
        row_T = torch.arange(length, device=alpha_UT.device) + count - length
        visible_UTJ = visible_UKJ[:, row_T.clamp_min(0)] & (row_T >= 0)[None, :, None]
        next_append_UT = F.pad(alpha_UT[:, 1:] == 0, (0, 1), value=True)
        self.slots.extend(next_append_UT, k_rot_UTD, vtilde_UTD, alpha_UT[:, 0] == 1)
        self.window = self._window_after(self.window, leaving)
        keys_UJD = torch.cat([keys_USD.to(k_rot_UTD.dtype), k_rot_UTD], dim=1)
        values_UJD = torch.cat([values_USD.to(vtilde_UTD.dtype), vtilde_UTD], dim=1)
        return keys_UJD, values_UJD, visible_UTJ

    def slot_counts(self) -> torch.Tensor:
        """Kept slots per (sequence, KV head), [B, G]: compressed slots plus exact tokens."""
        return self.slots.lengths_U.view(len(self.first_B), -1) + self.exact.length

    def allocated_bytes(self) -> int:
        if self.slots is None:
            return 0
        window = self.window
        return (
            self.slots.allocated_bytes()
            + _storage_bytes(window.k_BGWD, window.v_BGWD, window.w_BGW, window.run_len_BG)
            + _storage_bytes(self.first_B)
            + self.exact.allocated_bytes()
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
        self.slots = self.window = self.exact = self.first_B = None
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
        slots = self.layers[0].slots
        per_slot = slots.pool.page_bytes // slots.page_size
        rows_per_sequence = self.slot_counts().shape[-1]
        return int(self.real_tokens().sum()) * rows_per_sequence * per_slot * len(self.layers)


# ----------------------------------------------------------------------------------------------
# The model: transformers' Llama with its attention replaced (weights keep Llama names)
# ----------------------------------------------------------------------------------------------


class DMCLlamaAttention(LlamaAttention):
    """Llama attention with DMC: parallel form without a cache; with a `DMCCache`, parallel
    prefill into the compressed cache, then Algorithm 1 one token at a time. In heads mode
    the layer also owns `dmc_decision_proj`."""

    def __init__(self, config: LlamaDMCConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        if config.dmc_decision_source == "heads":
            self.dmc_decision_proj = DMCDecisionProjection(
                config.hidden_size, config.num_key_value_heads
            )

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
        logits = None
        if self.config.dmc_decision_source == "heads":
            logits = self.dmc_decision_proj(hidden_states, float(self.config.dmc_init_val))
        qkv = (q_BHTD, k_BGTD, v_BGTD, *position_embeddings)
        if cache is None:
            out_BHTD = self._parallel(*qkv, dmc_first_token, logits, self.training).out_BHTD
        else:
            out_BHTD = self._cached(cache.layers[self.layer_idx], *qkv, dmc_first_token, logits)
        out_BTE = out_BHTD.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(out_BTE), None

    def _parallel(self, q_BHTD, k_BGTD, v_BGTD, cos_BTD, sin_BTD, first_B, logits, training):
        cos_B1TD, sin_B1TD = cos_BTD[:, None], sin_BTD[:, None]
        return dmc_parallel_attention(
            q_BHTD, k_BGTD, v_BGTD, cos_B1TD, sin_B1TD, self.config, training, first_B, None, logits
        )

    def _cached(
        self, layer: DMCCacheLayer, q_BHTD, k_BGTD, v_BGTD, cos_BTD, sin_BTD, first_B, logits
    ):
        if layer.tokens_seen == 0:
            if first_B is None:
                first_B = torch.zeros(q_BHTD.shape[0], dtype=torch.long, device=q_BHTD.device)
            parallel = self._parallel(
                q_BHTD, k_BGTD, v_BGTD, cos_BTD, sin_BTD, first_B, logits, False
            )
            layer.prefill(parallel, first_B, cos_BTD, sin_BTD)
            return parallel.out_BHTD
        if q_BHTD.shape[2] > 1:
            return layer.extend(q_BHTD, k_BGTD, v_BGTD, cos_BTD, sin_BTD, logits)
        out_BHD = layer.decode(
            q_BHTD[:, :, 0], k_BGTD[:, :, 0], v_BGTD[:, :, 0], cos_BTD[:, 0], sin_BTD[:, 0], logits
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

    def _init_weights(self, module: nn.Module) -> None:
        """Llama's initialisation; decision heads start at zero (the model is the original)."""
        super()._init_weights(module)
        if isinstance(module, DMCDecisionProjection):
            zeros_(module.weight)


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
        if first_B is not None and self.config.dmc_merge_delay:
            raise ValueError(
                "left padding is not supported with dmc_merge_delay > 0 (padding tokens would "
                "sit in the exact window); pass prompts of equal length or one at a time"
            )
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
