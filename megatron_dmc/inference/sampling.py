"""Next-token selection: greedy, or temperature / top-k / top-p sampling.

Legend: B sequences, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0
    """0 = greedy (argmax); otherwise logits are divided by it before sampling."""

    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""

    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1 = all)."""

    eos_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(
                "need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                f"{self.temperature}, {self.top_k}, {self.top_p}"
            )


def next_tokens(
    logits_BV: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token id per row [B] (long)."""
    if sampling.temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / sampling.temperature
    if sampling.top_k:
        kth_B1 = logits_BV.topk(min(sampling.top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        before_BV = probs_BV.cumsum(dim=-1) - probs_BV
        sorted_BV = sorted_BV.masked_fill(before_BV >= sampling.top_p, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(-1, order_BV, sorted_BV)
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
