"""The trained rows' targets, appended to report.md: each row's tokens and wall time, the
preset's perplexity-rise targets (`rise_targets`, e.g. DMC 2x <= +10% on the default
preset) and DMS against the eviction baselines (DMS rise <= H2O's below 8x; < H2O's and
TOVA's at 8x and above), each under the matched and today's continuation protocols, with
the margin when missed; then the ablation table when `ablation/ablation.json` exists.
"""

from __future__ import annotations

import json

from megatron_dmc.pipeline.goals import Verdict, ppl_change
from megatron_dmc.pipeline.layout import RunLayout, cr_tag

CONTINUATION = (
    ("ppl_matched_continuation", "matched continuation"),
    ("ppl_continuation", "continuation"),
)
"""(row key, protocol name) the targets are judged under."""
DMS_STRICT_CR = 8.0
"""From this CR on, DMS must beat both H2O and TOVA strictly."""


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:+.1f}%"


def rise_verdicts(summary: dict) -> list[Verdict]:
    """Each `rise_targets` row: its continuation-perplexity rise vs its largest allowed."""
    out = []
    rows = {t["label"]: t for t in summary["training"] if "label" in t}
    for label, allowed in summary["preset"].get("rise_targets", {}).items():
        if label not in rows:
            continue
        method, cr = rows[label]["method"], rows[label]["target_cr"]
        for key, protocol in CONTINUATION:
            rise = ppl_change(summary, method, cr, key)
            if rise is None:
                continue
            detail = f"rise {rise:+.1f}% (target <= {allowed:+.1f}%)"
            if rise > allowed:
                detail += f"; missed by {rise - allowed:.1f} points"
            out.append(Verdict(f"{label} rise <= {allowed:+g}%", protocol, rise <= allowed, detail))
    return out


def dms_verdicts(summary: dict) -> list[Verdict]:
    """Each DMS row against H2O (and TOVA from DMS_STRICT_CR on) at its CR."""
    out = []
    for t in summary["training"]:
        if t.get("method") != "dms":
            continue
        cr = t["target_cr"]
        strict = cr >= DMS_STRICT_CR
        rivals = ("h2o", "tova") if strict else ("h2o",)
        for key, protocol in CONTINUATION:
            dms = ppl_change(summary, "dms", cr, key)
            others = {r: ppl_change(summary, r, cr, key) for r in rivals}
            if dms is None or any(v is None for v in others.values()):
                continue
            bound = min(v for v in others.values() if v is not None)
            met = dms < bound if strict else dms <= bound
            shown = ", ".join(f"{r.upper()} {_fmt(v)}" for r, v in others.items())
            detail = f"DMS {dms:+.1f}% vs {shown}"
            if not met:
                detail += f"; missed by {dms - bound:.1f} points"
            names = " and ".join(r.upper() for r in rivals)
            goal = f"dms {cr_tag(cr)} rise {'<' if strict else '<='} {names}'s"
            out.append(Verdict(goal, protocol, met, detail))
    return out


def rows_table(summary: dict) -> str:
    """Per trained row: recipe, steps, tokens, wall time, final achieved CR."""
    from megatron_dmc.pipeline.report import table

    rows = []
    for t in summary["training"]:
        wall = t.get("wall_s")
        achieved = t.get("final_achieved_cr")
        rows.append([t.get("label", cr_tag(t["target_cr"])), t.get("recipe", "–"),
                     str(t["steps"]), str(t["tokens"]), "–" if wall is None else f"{wall:.0f}",
                     "–" if achieved is None else f"{achieved:.3f}"])  # fmt: skip
    header = ["row", "recipe", "steps", "training tokens", "wall s", "final achieved CR"]
    return table(header, rows)


def section(summary: dict, layout: RunLayout) -> str:
    """The markdown appended to report.md."""
    from megatron_dmc.pipeline.ablation import ablation_markdown

    parts = [
        "## Trained rows\n",
        "Training tokens count zero_out's for a row that started from it; wall time is its "
        "retrofit step plus zero_out (shared by the DMC rows of a channel recipe).\n",
        rows_table(summary),
    ]
    found = rise_verdicts(summary) + dms_verdicts(summary)
    if found:
        parts += ["## Targets (pipeline/targets.py)\n", "\n".join(v.line() for v in found) + "\n"]
    ablation = layout.ablation_dir / "ablation.json"
    if ablation.is_file():
        parts += ["## Ablation (`ablation/ablation.md`)\n",
                  ablation_markdown(json.loads(ablation.read_text()))]  # fmt: skip
    return "\n".join(parts)


def extend_report(layout: RunLayout, summary: dict) -> None:
    """Append the trained rows, their targets and the ablation to report.md."""
    with layout.report.open("a") as report:
        report.write("\n" + section(summary, layout))
