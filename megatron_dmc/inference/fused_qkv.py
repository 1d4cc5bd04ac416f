"""Decode's attention input projection as one matmul: q, k, v and the decision heads.

Legend: B sequences, T time, E hidden size, H query heads, G KV heads, D head dim,
F fused output width (H*D + 2*G*D, plus 2G with decision heads).

At decode a layer's projections are small matrix products on one token per sequence, so
their fixed costs dominate: one product against the rows of q_proj, k_proj, v_proj (and
dmc_decision_proj) stacked gives the same outputs in one call. The stacked weight is built
on first use and rebuilt whenever one of the weights is replaced or changed in place (it
is keyed on their identity and version counters); it holds a second copy of the layer's
q/k/v weights (and the heads').
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_dmc.ops import DecisionLogits, head_logits_from_outputs


class FusedProjection:
    """The stacked weight [F, E] of one attention layer, kept current with its weights."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._weight_FE: torch.Tensor | None = None

    def weight(self, linears: list[nn.Linear]) -> torch.Tensor:
        weights = [linear.weight for linear in linears]
        key = tuple((id(w), w.data_ptr(), w._version) for w in weights)
        if key != self._key:
            with torch.no_grad():
                self._weight_FE = torch.cat([w.detach() for w in weights])
            self._key = key
        return self._weight_FE

    def __call__(
        self, attn: nn.Module, x_BTE: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DecisionLogits | None]:
        """Raw pre-RoPE q [B,H,T,D], k [B,G,T,D], v [B,G,T,D] and the heads' logits (None
        without decision heads), as attn.qkv and attn.decisions give them."""
        heads = getattr(attn, "dmc_decision_proj", None)
        linears = [attn.q_proj, attn.k_proj, attn.v_proj] + ([heads] if heads else [])
        y_BTF = x_BTE @ self.weight(linears).t()
        b, t, _ = x_BTE.shape
        widths = [attn.heads * attn.dim, attn.groups * attn.dim, attn.groups * attn.dim]
        parts = y_BTF.split(widths + ([2 * attn.groups] if heads else []), dim=-1)
        q = parts[0].view(b, t, attn.heads, attn.dim).transpose(1, 2)
        k = parts[1].view(b, t, attn.groups, attn.dim).transpose(1, 2)
        v = parts[2].view(b, t, attn.groups, attn.dim).transpose(1, 2)
        logits = head_logits_from_outputs(parts[3], attn.init_val) if heads else None
        return q, k, v, logits
