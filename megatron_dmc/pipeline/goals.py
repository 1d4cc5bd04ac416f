"""The quality goals the report checks, from the evaluation rows of `summary.json`.

1. At each target, DMC's perplexity rise is at most half of the best training-free
   baseline's (H2O, TOVA) at the same CR. A baseline that lowers perplexity counts as a
   rise of 0, so DMC must then not raise it at all.
2. DMC beats GQA uptraining: compared with the DMC run whose budget the uptraining
   copied (its CR is at least the GQA model's).

Both are judged per protocol and each verdict names its protocol. The headline is the
matched continuation protocol: every method runs context and continuation in chunks and
holds at most the KV slots DMC's target allows over the tokens seen at every chunk
boundary, so the methods are compared at equal memory. Today's protocols (H2O/TOVA
compress after a dense prefill and keep the continuation uncompressed) follow.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_dmc.pipeline.layout import cr_tag

PROTOCOLS = (
    ("ppl_matched_continuation", "matched continuation"),
    ("ppl_matched_strided", "matched whole-sequence"),
    (
        "ppl_continuation",
        "continuation (compress after a dense prefill; continuation uncompressed)",
    ),
    ("ppl_strided", "whole-sequence (fixed budget of window/CR)"),
)
"""(row key, protocol named in the verdicts), the headline first."""
HEADLINE = PROTOCOLS[0][1]
BASELINES = ("h2o", "tova")


@dataclass(frozen=True)
class Verdict:
    goal: str
    protocol: str
    met: bool
    detail: str

    def line(self) -> str:
        mark = "met" if self.met else "NOT met"
        return f"- {self.goal} ({self.protocol}): **{mark}**. {self.detail}"


def _row(summary: dict, method: str, cr: float) -> dict | None:
    return next(
        (r for r in summary["results"] if r["method"] == method and r["compression_ratio"] == cr),
        None,
    )


def _ppl(summary: dict, method: str, cr: float, key: str) -> float | None:
    row = _row(summary, method, cr)
    return None if row is None else row.get(key)


def real_cr(summary: dict, method: str, cr: float, key: str) -> float | None:
    """The real CR the row measured under the protocol of `key` (None where not recorded)."""
    row = _row(summary, method, cr)
    return None if row is None else row.get("real_cr", {}).get(key.removeprefix("ppl_"))


def ppl_change(summary: dict, method: str, cr: float, key: str) -> float | None:
    """Percent change of `method` at `cr` against vanilla; None where a row is missing."""
    base, value = _ppl(summary, "vanilla", 1.0, key), _ppl(summary, method, cr, key)
    if base is None or value is None:
        return None
    return 100.0 * (value / base - 1.0)


def half_of_best_baseline(summary: dict, cr: float, key: str, protocol: str) -> Verdict | None:
    dmc = ppl_change(summary, "dmc", cr, key)
    changes = {b: ppl_change(summary, b, cr, key) for b in BASELINES}
    changes = {b: v for b, v in changes.items() if v is not None}
    if dmc is None or not changes:
        return None
    best = min(changes, key=changes.get)
    allowed = max(changes[best], 0.0) / 2.0
    detail = (
        f"DMC {dmc:+.1f}% vs best baseline {best.upper()} {changes[best]:+.1f}% "
        f"(allowed: {allowed:+.1f}%)"
    )
    goal = f"DMC {cr_tag(cr)} rise <= half the best baseline's"
    return Verdict(goal, protocol, dmc <= allowed, detail)


def beats_gqa_uptraining(summary: dict, key: str, protocol: str) -> Verdict | None:
    gqa = summary.get("gqa_training")
    if not gqa:
        return None
    gqa_cr, dmc_cr = gqa["compression_ratio"], gqa["budget_target_cr"]
    dmc, up = (
        ppl_change(summary, "dmc", dmc_cr, key),
        ppl_change(summary, "gqa-uptrained", gqa_cr, key),
    )
    if dmc is None or up is None:
        return None
    detail = f"DMC {cr_tag(dmc_cr)} {dmc:+.1f}% vs GQA uptrained {cr_tag(gqa_cr)} {up:+.1f}%"
    return Verdict("DMC beats GQA uptraining", protocol, dmc < up, detail)


def verdicts(summary: dict) -> list[Verdict]:
    """Every goal the summary's rows can judge, the headline protocol first."""
    out: list[Verdict] = []
    for key, protocol in PROTOCOLS:
        for t in summary["training"]:
            if t.get("method", "dmc") == "dmc":
                out.append(half_of_best_baseline(summary, t["target_cr"], key, protocol))
        out.append(beats_gqa_uptraining(summary, key, protocol))
    return [v for v in out if v is not None]
