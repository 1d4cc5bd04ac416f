"""A lean Llama decoder for inference with the paged DMC cache (weights in HF naming).

Legend: B sequences, T time, E hidden size, V vocabulary, H query heads, G KV heads,
D head dim.

Four entry points: `forward` (the full eval-mode forward without a cache, the parity
reference, built on ops.dmc_self_attention), `prefill` (parallel, chunk by chunk, every
layer writing its compressed cache as it is computed), `decode` (one token per
sequence) and `extend` (logits of every token of a chunk appended to cached sequences:
scoring, as evaluation needs). dmc None runs plain Llama attention (vanilla) through the
same engine. With decision heads (`decision_source="heads"`) each layer also has
`self_attn.dmc_decision_proj` ([2G, E], HF name
`model.layers.N.self_attn.dmc_decision_proj.weight`); DMS's query neuron
(`decision_source="query"`) reads them from q (`ops.rope_for_query` keeps it out of attention). With a merge delay W the first chunk
of a prefill is parallel (`prefill` runs one chunk) and `extend` continues in parallel
(delayed_prefill.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_dmc.inference.decisions import ForcedRate
from megatron_dmc.inference.delay import DecodeStep
from megatron_dmc.inference.delayed_prefill import delayed_chunk_attention
from megatron_dmc.inference.fused_qkv import FusedProjection
from megatron_dmc.inference.kv_cache import CacheConfig, PagedKVCache
from megatron_dmc.inference.prefill import prefill_attention
from megatron_dmc.ops import (
    DecisionLogits,
    DMCConfig,
    apply_rope,
    decision_head_logits,
    dmc_self_attention,
    rope_cos_sin,
)
from megatron_dmc.schema.llama import LlamaShape


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape, dmc: DMCConfig | None) -> None:
        super().__init__()
        heads, groups, dim = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
        self.q_proj = nn.Linear(shape.hidden_size, heads * dim, bias=False)
        self.k_proj = nn.Linear(shape.hidden_size, groups * dim, bias=False)
        self.v_proj = nn.Linear(shape.hidden_size, groups * dim, bias=False)
        self.o_proj = nn.Linear(heads * dim, shape.hidden_size, bias=False)
        self.heads, self.groups, self.dim = heads, groups, dim
        self.init_val = dmc.init_val if dmc else 0.0
        self.fused = FusedProjection()
        """One-token calls (decode): q, k, v and the heads' logits from one matmul."""
        if dmc is not None and dmc.uses_heads:
            self.dmc_decision_proj = nn.Linear(shape.hidden_size, 2 * groups, bias=False)
            """Rows 0..G-1: alpha logit of each KV head; G..2G-1: omega logit (ops.heads)."""

    def decisions(self, x_BTE: torch.Tensor) -> DecisionLogits | None:
        """Decision-head logits [B, G, T] of the (normed) attention input; None in channel
        and query mode (the attention reads them from q and k)."""
        if not hasattr(self, "dmc_decision_proj"):
            return None
        return decision_head_logits(x_BTE, self.dmc_decision_proj.weight, self.init_val)

    def qkv(self, x_BTE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw pre-RoPE q [B,H,T,D], k [B,G,T,D], v [B,G,T,D]."""
        b, t, _ = x_BTE.shape
        q = self.q_proj(x_BTE).view(b, t, self.heads, self.dim).transpose(1, 2)
        k = self.k_proj(x_BTE).view(b, t, self.groups, self.dim).transpose(1, 2)
        v = self.v_proj(x_BTE).view(b, t, self.groups, self.dim).transpose(1, 2)
        return q, k, v

    def out(self, o_BHTD: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = o_BHTD.shape
        return self.o_proj(o_BHTD.transpose(1, 2).reshape(b, t, self.heads * self.dim))


class MLP(nn.Module):
    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.up_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, shape: LlamaShape, dmc: DMCConfig | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.self_attn = Attention(shape, dmc)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = MLP(shape)

    def forward(self, x_BTE: torch.Tensor, attend) -> torch.Tensor:
        """attend(q, k, v, logits) -> [B, H, T, D] is the attention of this call (full,
        prefill, decode); logits are the decision heads' (None in channel mode)."""
        h_BTE = self.input_layernorm(x_BTE)
        attn = self.self_attn
        if h_BTE.shape[1] == 1:
            o_BHTD = attend(*attn.fused(attn, h_BTE))
        else:
            o_BHTD = attend(*attn.qkv(h_BTE), attn.decisions(h_BTE))
        x_BTE = x_BTE + self.self_attn.out(o_BHTD)
        return x_BTE + self.mlp(self.post_attention_layernorm(x_BTE))


class Backbone(nn.Module):
    def __init__(self, shape: LlamaShape, dmc: DMCConfig | None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(shape, dmc) for _ in range(shape.num_hidden_layers)
        )
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)


class LlamaForInference(nn.Module):
    """Llama with HF parameter names (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`)."""

    def __init__(
        self, shape: LlamaShape, dmc: DMCConfig | None, forced: ForcedRate | None = None
    ) -> None:
        super().__init__()
        if forced is not None and dmc is None:
            raise ValueError("forced-rate decisions need DMC mode (pass a DMCConfig)")
        self.shape, self.dmc, self.forced = shape, dmc, forced
        self.model = Backbone(shape, dmc)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        if shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.last_prefill_transient_bytes = 0
        """Largest one-layer, one-chunk dense K/V working set of the last prefill (estimate)."""

    def cache_config(self, num_pages: int, max_batch: int, max_seq_len: int, **kw) -> CacheConfig:
        """A CacheConfig matching this model (mode, window, heads, dtype)."""
        kw.setdefault("dtype", self.lm_head.weight.dtype)
        kw.setdefault("device", str(self.lm_head.weight.device))
        return CacheConfig(
            num_layers=self.shape.num_hidden_layers,
            num_kv_heads=self.shape.num_key_value_heads,
            head_dim=self.shape.head_dim,
            num_pages=num_pages,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            window=self.dmc.window_size if self.dmc else 12,
            compress=self.dmc is not None,
            decision_channel=self.dmc.uses_channel if self.dmc else True,
            merge_delay=self.dmc.merge_delay if self.dmc else 0,
            **kw,
        )

    @property
    def _delayed(self) -> bool:
        return self.dmc is not None and self.dmc.merge_delay > 0

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.lm_head.weight.dtype
        return rope_cos_sin(positions, self.shape.head_dim, self.shape.rope_theta, dtype)

    def _run(self, tokens_BT: torch.Tensor, attend_for_layer) -> torch.Tensor:
        x_BTE = self.model.embed_tokens(tokens_BT)
        for index, layer in enumerate(self.model.layers):
            x_BTE = layer(x_BTE, attend_for_layer(index))
        return self.model.norm(x_BTE)

    @torch.no_grad()
    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of the full eval-mode forward (no cache, no padding)."""
        cos_TD, sin_TD = self._rope(torch.arange(tokens_BT.shape[1], device=tokens_BT.device))

        def attend(q_BHTD, k_BGTD, v_BGTD, logits):
            if self.dmc is None:
                q_rot, k_rot = (
                    apply_rope(q_BHTD, cos_TD, sin_TD),
                    apply_rope(k_BGTD, cos_TD, sin_TD),
                )
                return F.scaled_dot_product_attention(
                    q_rot, k_rot, v_BGTD, is_causal=True, enable_gqa=True
                )
            return dmc_self_attention(
                q_BHTD, k_BGTD, v_BGTD, cos_TD, sin_TD, self.dmc, training=False, logits=logits
            )[0]

        return self.lm_head(self._run(tokens_BT, lambda _: attend))

    @torch.no_grad()
    def prefill(
        self,
        tokens_BT: torch.Tensor,
        lengths_B: torch.Tensor,
        cache: PagedKVCache,
        seq_ids_B: torch.Tensor,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Parallel prefill of right-padded prompts; logits [B, V] of each last prompt token."""
        batch, length = tokens_BT.shape
        if bool((lengths_B < 1).any()) or int(lengths_B.max()) > length:
            raise ValueError("every prompt needs 1..T tokens (lengths_B within the padded width)")
        step = chunk_size or length
        if self._delayed:
            step = length  # a later chunk would run token by token (see extend)
        last_BE = torch.zeros(batch, self.shape.hidden_size, dtype=self.lm_head.weight.dtype)
        for start in range(0, length, step):
            end = min(start + step, length)
            chunk_lengths_B = (lengths_B - start).clamp(0, end - start)
            hidden_BTE = self._prefill_chunk(
                tokens_BT[:, start:end], start, chunk_lengths_B, cache, seq_ids_B
            )
            ends_here_B = (lengths_B > start) & (lengths_B <= end)
            last_BE[ends_here_B] = hidden_BTE[ends_here_B, lengths_B[ends_here_B] - 1 - start]
        return self.lm_head(last_BE)

    @torch.no_grad()
    def extend(
        self,
        tokens_BT: torch.Tensor,
        cache: PagedKVCache,
        seq_ids_B: torch.Tensor,
        backend: str = "padded",
    ) -> torch.Tensor:
        """Logits [B, T, V] of a chunk appended to sequences that have seen equally many tokens.

        One decode step when T == 1, else a parallel chunk (a continuation chunk attends to
        the cached slots); either way the cache then holds the chunk.
        """
        seen_B = cache.seen_LB[0, seq_ids_B]
        start, length = int(seen_B[0]), tokens_BT.shape[1]
        if bool((seen_B != start).any()):
            raise ValueError("extend needs sequences at one position; prefill ragged prompts")
        if length < 1 or start + length > self.shape.max_position_embeddings:
            raise ValueError(
                f"tokens {start}..{start + length} must be a non-empty chunk within "
                f"max_position_embeddings={self.shape.max_position_embeddings}"
            )
        if length == 1:
            return self.decode(tokens_BT[:, 0], cache, seq_ids_B, backend)[:, None]
        lengths_B = torch.full_like(seq_ids_B, length)
        return self.lm_head(self._prefill_chunk(tokens_BT, start, lengths_B, cache, seq_ids_B))

    def _prefill_chunk(self, tokens_BT, start, lengths_B, cache, seq_ids_B) -> torch.Tensor:
        batch, length = tokens_BT.shape
        positions_BT = torch.arange(start, start + length, device=tokens_BT.device).expand(
            batch, -1
        )
        cos_BTD, sin_BTD = (t.expand(batch, -1, -1) for t in self._rope(positions_BT[0]))
        self.last_prefill_transient_bytes = max(
            self.last_prefill_transient_bytes if start else 0,
            self._working_set_bytes(batch, length, int(cache.lengths_LBG[:, seq_ids_B].max())),
        )

        def attend_for_layer(layer: int):
            def attend(q, k, v, logits):
                if self._delayed and start > 0:
                    return delayed_chunk_attention(
                        q,
                        k,
                        v,
                        start,
                        cos_BTD[0],
                        sin_BTD[0],
                        self._rope,
                        cache,
                        layer,
                        seq_ids_B,
                        self.dmc,
                        self.forced,
                        logits,
                    )
                return prefill_attention(
                    q,
                    k,
                    v,
                    positions_BT,
                    cos_BTD,
                    sin_BTD,
                    cache,
                    layer,
                    seq_ids_B,
                    lengths_B,
                    self.dmc,
                    self.forced,
                    logits,
                )

            return attend

        return self._run(tokens_BT, attend_for_layer)

    def _working_set_bytes(self, batch: int, length: int, cached_slots: int) -> int:
        """Dense K/V tensors one layer holds while prefilling a chunk (estimated from shapes).

        Raw k and v plus the rotated keys (vanilla), or raw k, v, zeroed k, ktilde, vtilde
        and rotated keys (DMC); a continuation chunk also gathers the layer's cached slots.
        """
        per_token = batch * self.shape.num_key_value_heads * self.shape.head_dim
        tensors = 3 if self.dmc is None else 6
        elements = per_token * (tensors * length + 2 * cached_slots)
        return elements * self.lm_head.weight.element_size()

    @torch.no_grad()
    def decode(
        self,
        tokens_B: torch.Tensor,
        cache: PagedKVCache,
        seq_ids_B: torch.Tensor,
        backend: str = "paged",
    ) -> torch.Tensor:
        """One new token per sequence at its next position; returns logits [B, V]."""
        cache.check_step_capacity(seq_ids_B)
        positions_B = cache.seen_LB[0, seq_ids_B].clone()
        if int(positions_B.max()) >= self.shape.max_position_embeddings:
            raise ValueError(
                f"position {int(positions_B.max())} is beyond max_position_embeddings="
                f"{self.shape.max_position_embeddings}; stop generation earlier"
            )
        cos_BD, sin_BD = self._rope(positions_B)

        step = DecodeStep(positions_B, cos_BD, sin_BD, self._rope, self.dmc, self.forced)

        def attend_for_layer(layer: int):
            def attend(q, k, v, logits):
                out_BHD = step.attend(
                    q[:, :, 0], k[:, :, 0], v[:, :, 0], logits, cache, layer, seq_ids_B, backend
                )
                return out_BHD[:, :, None]

            return attend

        return self.lm_head(self._run(tokens_B[:, None], attend_for_layer)[:, 0])
