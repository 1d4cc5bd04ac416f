"""The report's quality goals judged on hand-made evaluation rows."""

from __future__ import annotations

from megatron_dmc.pipeline.goals import HEADLINE, PROTOCOLS, verdicts
from megatron_dmc.pipeline.report import _goals

CONTINUATION, WHOLE = PROTOCOLS[2][1], PROTOCOLS[3][1]


def _row(method: str, cr: float, continuation: float, strided: float) -> dict:
    return {"method": method, "compression_ratio": cr, "ppl_continuation": continuation,
            "ppl_strided": strided}  # fmt: skip


def _matched(summary: dict, changes: dict[str, float]) -> dict:
    """The summary with matched-continuation perplexities: {method: ppl} at 2x, vanilla 10."""
    for row in summary["results"]:
        value = 10.0 if row["method"] == "vanilla" else changes.get(row["method"])
        if value is not None and row["compression_ratio"] in (1.0, 2.0):
            row["ppl_matched_continuation"] = value
            row["real_cr"] = {"matched_continuation": row["compression_ratio"]}
    return summary


def _summary(dmc_2x: float, h2o_2x: float, dmc_4x: float, gqa_up: float) -> dict:
    rows = [
        _row("vanilla", 1.0, 10.0, 10.0),
        _row("dmc", 2.0, dmc_2x, dmc_2x),
        _row("h2o", 2.0, h2o_2x, h2o_2x),
        _row("tova", 2.0, 10.5, 10.5),
        _row("dmc", 4.0, dmc_4x, dmc_4x),
        _row("gqa-uptrained", 3.0, gqa_up, gqa_up),
    ]
    training = [{"target_cr": 2.0}, {"target_cr": 4.0}]
    gqa = {"compression_ratio": 3.0, "budget_target_cr": 4.0}
    return {"results": rows, "training": training, "gqa_training": gqa}


def _met(summary: dict) -> dict[tuple[str, str], bool]:
    return {(v.goal, v.protocol): v.met for v in verdicts(summary)}


def test_half_of_the_best_baselines_rise_is_the_bar():
    met = _met(_summary(dmc_2x=10.1, h2o_2x=10.2, dmc_4x=11.0, gqa_up=12.0))
    assert met[("DMC 2x rise <= half the best baseline's", CONTINUATION)]
    assert met[("DMC beats GQA uptraining", CONTINUATION)]
    assert ("DMC 4x rise <= half the best baseline's", CONTINUATION) not in met  # no baseline
    assert not any(protocol == HEADLINE for _, protocol in met)  # not measured, not judged

    met = _met(_summary(dmc_2x=10.11, h2o_2x=10.2, dmc_4x=12.5, gqa_up=12.0))
    assert not met[("DMC 2x rise <= half the best baseline's", WHOLE)]
    assert not met[("DMC beats GQA uptraining", WHOLE)]


def test_a_baseline_that_lowers_perplexity_leaves_dmc_no_rise():
    assert not _met(_summary(10.01, 9.9, 11.0, 12.0))[
        ("DMC 2x rise <= half the best baseline's", CONTINUATION)
    ]
    assert _met(_summary(9.99, 9.9, 11.0, 12.0))[
        ("DMC 2x rise <= half the best baseline's", CONTINUATION)
    ]


def test_the_headline_is_judged_on_the_matched_protocol():
    summary = _matched(_summary(10.1, 10.2, 12.5, 12.0), {"dmc": 10.5, "h2o": 10.4, "tova": 12})
    found = verdicts(summary)
    assert found[0].protocol == HEADLINE == "matched continuation"
    assert not found[0].met and "H2O +4.0%" in found[0].detail
    assert _met(summary)[("DMC 2x rise <= half the best baseline's", CONTINUATION)]
    _, body = _goals(summary)
    headline, rest = body.split("Under the other protocols:")
    assert "matched continuation" in headline and "**NOT met**" in headline
    assert "dense prefill" in rest and "**met**" in rest


def test_the_report_states_each_verdict_or_leaves_the_section_out():
    heading, body = _goals(_summary(10.1, 10.2, 12.5, 12.0))
    assert heading.startswith("## Quality goals")
    lines = body.splitlines()
    assert len(lines) == 4  # (2x vs baselines, GQA) x two protocols, no matched rows
    assert "DMC 2x" in lines[0] and "**met**" in lines[0] and "H2O +2.0%" in lines[0]
    assert "GQA" in lines[1] and "**NOT met**" in lines[1]
    assert _goals({"results": [], "training": [{"target_cr": 2.0}]}) == []
