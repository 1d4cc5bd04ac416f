"""The report's quality goals judged on hand-made evaluation rows."""

from __future__ import annotations

from megatron_dmc.pipeline.goals import verdicts
from megatron_dmc.pipeline.report import _goals


def _row(method: str, cr: float, continuation: float, strided: float) -> dict:
    return {"method": method, "compression_ratio": cr, "ppl_continuation": continuation,
            "ppl_strided": strided}  # fmt: skip


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
    assert met[("DMC 2x rise <= half the best baseline's", "continuation")]
    assert met[("DMC beats GQA uptraining", "continuation")]
    assert ("DMC 4x rise <= half the best baseline's", "continuation") not in met  # no baseline

    met = _met(_summary(dmc_2x=10.11, h2o_2x=10.2, dmc_4x=12.5, gqa_up=12.0))
    assert not met[("DMC 2x rise <= half the best baseline's", "whole-sequence")]
    assert not met[("DMC beats GQA uptraining", "whole-sequence")]


def test_a_baseline_that_lowers_perplexity_leaves_dmc_no_rise():
    assert not _met(_summary(10.01, 9.9, 11.0, 12.0))[
        ("DMC 2x rise <= half the best baseline's", "continuation")
    ]
    assert _met(_summary(9.99, 9.9, 11.0, 12.0))[
        ("DMC 2x rise <= half the best baseline's", "continuation")
    ]


def test_the_report_states_each_verdict_or_leaves_the_section_out():
    heading, body = _goals(_summary(10.1, 10.2, 12.5, 12.0))
    assert heading.startswith("## Quality goals")
    lines = body.splitlines()
    assert len(lines) == 4  # (2x vs baselines, GQA) x two protocols
    assert "DMC 2x" in lines[0] and "**met**" in lines[0] and "H2O +2.0%" in lines[0]
    assert "GQA" in lines[1] and "**NOT met**" in lines[1]
    assert _goals({"results": [], "training": [{"target_cr": 2.0}]}) == []
