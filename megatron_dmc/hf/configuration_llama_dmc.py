"""Configuration of a Llama retrofitted with Dynamic Memory Compression (DMC).

Self-contained (imports only transformers) so that it can be copied next to an exported
checkpoint and loaded with `trust_remote_code=True`. Field names follow the flags of the
reference DMC release.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

DECISION_SOURCES = ("channel", "heads", "query")
"""`dmc_decision_source` values (those of `megatron_dmc.ops.DMCConfig.decision_source`)."""


@strict
class LlamaDMCConfig(LlamaConfig):
    model_type = "llama_dmc"

    dmc_window_size: int = 12
    """Tokens a merged cache slot averages at most (training uses the same window)."""

    dmc_init_val: int | float = 5.0
    """c: merge iff k[D-1] > c; importance = sigmoid(mean_group(q[D-1]) + c)."""

    dmc_decision_channel: int = -1
    """Channel of each head that carries the decision and importance; only -1 (last)."""

    dmc_temperature: int | float = 0.1
    """Gumbel-sigmoid temperature, used only in training mode."""

    dmc_target_cr: int | float | None = None
    """Target compression ratio of the retrofit (informational)."""

    dmc_layer_head_cr: list | None = None
    """Optional trained compression ratio per layer and KV head, [layers][kv_heads]."""

    dmc_decision_source: str = "channel"
    """Where the merge and importance logits come from: "channel" (the paper: channel D-1 of
    q and k, zeroed before and after RoPE), "heads" (each layer's `dmc_decision_proj`, a
    [2 * KV heads, hidden] projection of the attention input; q, k and RoPE untouched) or
    "query" (dmc_kv_method "dms" only, the DMS reference's `dms_separate_alpha=False`:
    eviction logit 100 * q[D-1] - dmc_init_val of the first query head of each KV group,
    pre-RoPE; that channel of those heads is zeroed before and after RoPE; no extra
    tensor)."""

    dmc_merge_delay: int = 0
    """The most recent dmc_merge_delay tokens of every KV head are attended exactly; a
    token's merge decision takes effect when it leaves that window. 0 is the paper."""

    dmc_kv_method: str = "dmc"
    """"dmc": merging (the paper). "dms": learned delayed eviction (one token per slot; the
    decision read at token t evicts token t-1 once it is more than dmc_merge_delay tokens
    behind); needs dmc_window_size 1 and dmc_decision_source "heads" or "query"."""

    dmc_decision_threshold: int | float = 0.0
    """tau: merge (or evict) iff the alpha logit exceeds tau. 0 as trained; `python -m
    megatron_dmc.eval calibrate` sets it so that the real compression ratio at a given length
    equals dmc_target_cr."""

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        # a plain Llama config.json loaded into this class must not keep "llama"
        self.__dict__.pop("model_type", None)
        _check_dmc_fields(self)


def _check_dmc_fields(config: LlamaDMCConfig) -> None:
    if config.dmc_decision_channel != -1:
        raise ValueError(
            f"dmc_decision_channel={config.dmc_decision_channel} is not supported: DMC reads "
            "the decision from the last channel of each head; set dmc_decision_channel=-1"
        )
    if config.dmc_window_size < 1:
        raise ValueError(
            f"dmc_window_size must be >= 1 (the release uses 12); got {config.dmc_window_size}"
        )
    if config.dmc_temperature <= 0:
        raise ValueError(
            f"dmc_temperature must be > 0 (0.1 in training); got {config.dmc_temperature}"
        )
    if config.dmc_decision_source not in DECISION_SOURCES:
        raise ValueError(
            f"dmc_decision_source must be one of {DECISION_SOURCES}; "
            f"got {config.dmc_decision_source!r}"
        )
    if not isinstance(config.dmc_merge_delay, int) or config.dmc_merge_delay < 0:
        raise ValueError(
            f"dmc_merge_delay must be an integer >= 0 (0 = the paper); got {config.dmc_merge_delay!r}"
        )
    if config.dmc_kv_method not in ("dmc", "dms"):
        raise ValueError(f"dmc_kv_method must be 'dmc' or 'dms'; got {config.dmc_kv_method!r}")
    if config.dmc_kv_method == "dms" and (
        config.dmc_window_size != 1 or config.dmc_decision_source == "channel"
    ):
        raise ValueError(
            "dmc_kv_method 'dms' needs dmc_window_size 1 and dmc_decision_source 'heads' or "
            f"'query'; got {config.dmc_window_size} and {config.dmc_decision_source!r}"
        )
    if config.dmc_kv_method == "dmc" and config.dmc_decision_source == "query":
        raise ValueError(
            "dmc_decision_source 'query' (DMS's query neuron) needs dmc_kv_method 'dms'"
        )
    if config.head_dim < 2:
        raise ValueError(f"DMC needs head_dim >= 2 to repurpose one channel; got {config.head_dim}")
    if config.dmc_target_cr is not None and config.dmc_target_cr < 1:
        raise ValueError(
            f"dmc_target_cr must be >= 1 (1 = no compression) or None; got {config.dmc_target_cr}"
        )
    _check_layer_head_cr(config)


def _check_layer_head_cr(config: LlamaDMCConfig) -> None:
    table = config.dmc_layer_head_cr
    if table is None:
        return
    expected = (config.num_hidden_layers, config.num_key_value_heads)
    shape_ok = len(table) == expected[0] and all(
        isinstance(row, list) and len(row) == expected[1] for row in table
    )
    if not shape_ok:
        raise ValueError(
            "dmc_layer_head_cr must be a list of num_hidden_layers lists of num_key_value_heads "
            f"ratios, shape {expected}; set it to None when unknown"
        )


__all__ = ["LlamaDMCConfig"]
