"""DMS (learned delayed eviction): its config and its sequential reference.

Legend: B batch, H query heads, G KV heads, T time, D head dim, W window (merge delay).

DMS (Łańcucki, Staniszewski, Nawrot, Ponti, 2025) keeps every token in its own slot; the
decision read at position t (logit 100 * W x_t - 5 of the decision heads, `DMCConfig`'s
alpha row; or 100 * q_t[D-1] - 5 of each group's first query head, decision_source
"query") says whether token t-1 is evicted. Token j is dropped once it is more than W
positions behind the query, if its decision says evict. The parallel training form is
the shared one (`ops.forward.dmc_self_attention`): with one token per slot
(`slot_keys_values`) DMC's bias log(1 - alpha_{j+1}) on keys more than W behind the query
is exactly DMS's. `dms_sequential_reference` is the token-by-token cache it must equal.
"""

from __future__ import annotations

import math

import torch

from megatron_dmc.ops._checks import check_qkv
from megatron_dmc.ops.config import DMCConfig
from megatron_dmc.ops.forward import resolve_decision_logits, rope_for_query
from megatron_dmc.ops.heads import DecisionLogits
from megatron_dmc.ops.rope import apply_rope

DEFAULT_DMS_WINDOW = 256
"""The reference's sliding window for long contexts; short CPU runs use 16."""


def dms_config(
    merge_delay: int = DEFAULT_DMS_WINDOW,
    init_val: float = 5.0,
    temperature: float = 0.1,
    decision_source: str = "heads",
) -> DMCConfig:
    """DMS settings: one token per slot, decisions from the zero-initialised heads (or from
    the repurposed query neuron, decision_source="query")."""
    return DMCConfig(
        window_size=1,
        init_val=init_val,
        temperature=temperature,
        decision_source=decision_source,
        merge_delay=merge_delay,
        kv_method="dms",
    )


def _check_dms(config: DMCConfig) -> None:
    if not config.evicts:
        raise ValueError("dms_sequential_reference needs kv_method='dms' (ops.dms.dms_config)")


def _head_stream(q_RTD, k_TD, v_TD, evict_T, window: int) -> tuple[torch.Tensor, int]:
    """One KV head: outputs [R, T, D] of its query heads and the final cache length."""
    cache: list[int] = []
    out_RTD = torch.zeros_like(q_RTD[..., : v_TD.shape[-1]])
    for t in range(k_TD.shape[0]):
        cache.append(t)
        cache = [j for j in cache if not (t - j > window and evict_T[j])]
        keys_SD, values_SD = k_TD[cache], v_TD[cache]
        scores_RS = q_RTD[:, t] @ keys_SD.t() / math.sqrt(q_RTD.shape[-1])
        out_RTD[:, t] = torch.softmax(scores_RS, dim=-1) @ values_SD
    return out_RTD, len(cache)


def dms_sequential_reference(
    q_BHTD: torch.Tensor,
    k_BGTD: torch.Tensor,
    v_BGTD: torch.Tensor,
    cos_TD: torch.Tensor,
    sin_TD: torch.Tensor,
    config: DMCConfig,
    logits: DecisionLogits | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode DMS token by token. Returns ([B, H, T, D], cache lengths [B, G]).

    `logits`: the decision heads' (heads mode); read from q with decision_source "query".
    Each KV head keeps a list of token slots; at time t token t enters, token t-1's
    decision (logit at t > 0) becomes known, and every token more than W behind t whose
    decision says evict is dropped before query t attends.
    """
    check_qkv(q_BHTD, k_BGTD, v_BGTD)
    _check_dms(config)
    logits = resolve_decision_logits(q_BHTD, k_BGTD, config, logits)
    b, h = q_BHTD.shape[:2]
    evict_BGT = torch.cat(
        [logits.alpha_BGT[..., 1:] > 0, torch.zeros_like(logits.alpha_BGT[..., :1], dtype=bool)],
        dim=-1,
    )
    g = k_BGTD.shape[1]
    q_rot_BHTD = rope_for_query(q_BHTD, cos_TD, sin_TD, config, g)
    k_rot_BGTD = apply_rope(k_BGTD, cos_TD, sin_TD)
    out_BHTD = torch.zeros_like(q_BHTD[..., : v_BGTD.shape[-1]])
    lengths_BG = torch.zeros(b, g, dtype=torch.long)
    r = h // g
    for bi in range(b):
        for gi in range(g):
            out_RTD, lengths_BG[bi, gi] = _head_stream(
                q_rot_BHTD[bi, gi * r : (gi + 1) * r],
                k_rot_BGTD[bi, gi],
                v_BGTD[bi, gi],
                evict_BGT[bi, gi],
                config.merge_delay,
            )
            out_BHTD[bi, gi * r : (gi + 1) * r] = out_RTD
    return out_BHTD, lengths_BG
