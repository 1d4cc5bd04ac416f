"""The DMC hyperparameters of one attention layer."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_dmc.ops._checks import check_window

DECISION_SOURCES = ("channel", "heads", "query")
KV_METHODS = ("dmc", "dms")
DMS_DECISION_SOURCES = ("heads", "query")


@dataclass(frozen=True)
class DMCConfig:
    window_size: int = 12
    """Tokens a merged slot averages at most (the release's ring buffer); training matches."""

    init_val: float = 5.0
    """c: alpha logit = k[D-1] - c, omega = sigmoid(q[D-1] + c). c = 5 gives alpha ~ 0.0067."""

    temperature: float = 0.1
    """Gumbel-sigmoid temperature, constant through training."""

    decision_source: str = "channel"
    """Where alpha and omega come from. "channel": the paper's repurposed channel D-1 of q
    and k (zeroed before and after RoPE). "heads": a separate zero-initialised projection of
    the attention input, `ops.heads.decision_head_logits`; q, k and RoPE stay untouched.
    "query" (DMS only): the DMS reference's repurposed query neuron, channel D-1 of the first
    query head of each KV group, `ops.heads.query_decision_logits`; that one channel is
    zeroed for attention (before and after RoPE), keys are untouched."""

    merge_delay: int = 0
    """W: the most recent W tokens of every head are always attended exactly; a token's
    merge decision takes effect when it leaves that window. 0 is the paper."""

    kv_method: str = "dmc"
    """"dmc": merging (the paper). "dms": learned delayed eviction (DMS, `ops.dms`): the
    decision read at token t evicts token t-1 once it leaves the window of W exact tokens.
    That is DMC with slots of one token (a merge replaces the previous slot), so "dms"
    needs window_size=1 and decision_source "heads" or "query"; `ops.dms.dms_config`
    builds one."""

    decision_threshold: float = 0.0
    """tau: every alpha logit is lowered by tau before it is used (eval: merge or evict iff
    logit > tau). 0 while training; set after training by `eval.calibrate` so that the real
    CR at the evaluation length equals the target."""

    def __post_init__(self) -> None:
        check_window(self.window_size)
        if not math.isfinite(self.decision_threshold):
            raise ValueError(
                f"decision_threshold must be a finite number; got {self.decision_threshold!r}"
            )
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 (the paper uses 0.1); got {self.temperature!r}"
            )
        if self.decision_source not in DECISION_SOURCES:
            raise ValueError(
                f"decision_source must be one of {DECISION_SOURCES}; got {self.decision_source!r}"
            )
        if not isinstance(self.merge_delay, int) or self.merge_delay < 0:
            raise ValueError(
                f"merge_delay must be an integer >= 0 (0 = the paper); got {self.merge_delay!r}"
            )
        self._check_kv_method()

    def _check_kv_method(self) -> None:
        if self.kv_method not in KV_METHODS:
            raise ValueError(f"kv_method must be one of {KV_METHODS}; got {self.kv_method!r}")
        if self.kv_method == "dms" and (
            self.window_size != 1 or self.decision_source not in DMS_DECISION_SOURCES
        ):
            raise ValueError(
                "kv_method='dms' evicts single tokens: it needs window_size=1 and "
                f"decision_source in {DMS_DECISION_SOURCES} (got window_size={self.window_size}, "
                f"decision_source={self.decision_source!r}); build it with "
                "ops.dms.dms_config(merge_delay, decision_source=...)"
            )
        if self.kv_method == "dmc" and self.decision_source == "query":
            raise ValueError(
                "decision_source='query' (one query neuron gives an eviction decision, no "
                "importance) is DMS's: use kv_method='dms'; DMC's repurposed channel is "
                "decision_source='channel'"
            )

    @property
    def evicts(self) -> bool:
        """True for DMS: a slot holds one token, a decision drops the previous token."""
        return self.kv_method == "dms"

    @property
    def uses_channel(self) -> bool:
        """True when channel D-1 of q and k is repurposed (and so zeroed)."""
        return self.decision_source == "channel"

    @property
    def uses_heads(self) -> bool:
        """True when a separate decision-head projection gives the logits."""
        return self.decision_source == "heads"

    @property
    def uses_query(self) -> bool:
        """True when DMS reads channel D-1 of the first query head of each group."""
        return self.decision_source == "query"
