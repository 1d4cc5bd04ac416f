"""report.md from summary.json: outcome, tables and the plots, in that order."""

from __future__ import annotations

from pathlib import Path

from megatron_dmc.eval.results import ResultRow, format_markdown
from megatron_dmc.pipeline.decode import headline_section
from megatron_dmc.pipeline.goals import HEADLINE, PROTOCOLS, ppl_change, real_cr, verdicts
from megatron_dmc.pipeline.layout import cr_tag

REACHED_TOLERANCE = 0.1
"""An achieved CR within 10% below the target counts as reached (as the trainer says)."""


RELEASE_STEPS_PER_CR = 6000


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def reached(achieved: float | None, target: float) -> bool:
    return achieved is not None and achieved >= target * (1.0 - REACHED_TOLERANCE)


def _reference_note(reference_length: int | None, cr: float) -> str:
    if reference_length is None:
        return ""
    return f" on the training sequences, i.e. {cr_tag(cr)} at {reference_length} tokens"


def outcome_lines(summary: dict) -> list[str]:
    lines = []
    decode = {d["label"]: d for d in summary["decode"]}
    for t in summary["training"]:
        cr, achieved = t["target_cr"], t["final_achieved_cr"]
        method = t.get("method", "dmc")
        label = t.get("label", f"dmc {cr_tag(cr)}")
        train_target = t["final_target_cr"] or cr
        verdict = "reached" if reached(achieved, train_target) else "NOT reached"
        held_out = decode.get(label, {}).get("compression_ratio")
        lines.append(
            f"- **{label}: target {verdict}.** Achieved CR at the last training step "
            f"{_fmt(achieved, '.4f')} (target {_fmt(t['final_target_cr'], '.4f')}"
            f"{_reference_note(t.get('cr_reference_length'), cr)}); "
            f"on held-out decoding {_fmt(held_out, '.3f')}."
        )
        lines += calibration_lines(t.get("calibration"))
        lines += protocol_lines(summary, (method, "h2o", "tova"), cr)
        if verdict != "reached":
            dmc_steps = t["stage_steps"]["retrofit"] + t["stage_steps"]["finetune"]
            lines.append(
                f"  - not reached within {dmc_steps} DMC steps; the release recipe trains "
                f"about {RELEASE_STEPS_PER_CR:,} steps of 4M tokens per +1x of CR"
            )
        loss = (t["lm_loss_start"], t["lm_loss_end"])
        lines.append(
            f"  - training LM loss (mean of first / last 5 steps): {_fmt(loss[0], '.3f')} -> "
            f"{_fmt(loss[1], '.3f')} over {t['steps']} steps ({t['tokens']} tokens)"
        )
    return lines


def calibration_lines(calibration: dict | None) -> list[str]:
    if calibration is None:
        return []
    s = calibration["settings"]
    length = s["context_len"] + s["continuation_len"]
    return [
        f"  - decision threshold {calibration['threshold']:.3f} (eval/calibrate.py): real CR "
        f"at {length} tokens of training text {calibration['uncalibrated_cr']:.3f} as trained "
        f"-> {calibration['real_cr']:.3f} (target {calibration['target_cr']:.2f}, "
        f"{len(calibration['probes'])} probes of {s['samples']} samples)"
    ]


def gqa_outcome_lines(summary: dict) -> list[str]:
    """The uptrained GQA baseline: its budget and its perplexity change, pooled vs uptrained."""
    g = summary.get("gqa_training")
    if not g:
        return []
    cr, budget = g["compression_ratio"], cr_tag(g["budget_target_cr"])
    lines = [
        f"- **GQA uptraining ({cr_tag(cr)}):** {g['steps']} plain-attention steps "
        f"({g['tokens']} tokens), the {budget} DMC run's budget, data and LR schedule; LM loss "
        f"(mean of first / last 5 steps) {_fmt(g['lm_loss_start'], '.3f')} -> "
        f"{_fmt(g['lm_loss_end'], '.3f')}"
    ]
    return lines + protocol_lines(summary, ("gqa-pooled", "gqa-uptrained"), cr)


def _change_and_cr(summary: dict, method: str, cr: float, key: str, change: float | None) -> str:
    name = method.upper() if method in ("dmc", "dms", "h2o", "tova") else method
    real = real_cr(summary, method, cr, key)
    return f"{name} {_fmt(change, '+.1f')}%" + ("" if real is None else f" (real CR {real:.2f})")


def protocol_lines(summary: dict, methods: tuple[str, ...], cr: float) -> list[str]:
    """Per protocol measured: each method's perplexity change vs vanilla and its real CR."""
    lines = []
    for key, name in PROTOCOLS:
        changes = {m: ppl_change(summary, m, cr, key) for m in methods}
        if all(v is None for v in changes.values()):
            continue
        shown = ", ".join(_change_and_cr(summary, m, cr, key, v) for m, v in changes.items())
        lines.append(f"  - {name}: perplexity vs vanilla at {cr_tag(cr)}: {shown}")
    return lines


def training_table(summary: dict) -> str:
    rows = []
    for t in summary["training"]:
        stages = t["stage_steps"]
        rows.append([t.get("label", cr_tag(t["target_cr"])), str(stages["zero_out"]), str(stages["retrofit"]),
                     str(stages["finetune"]), str(t["tokens"]), _fmt(t["lm_loss_start"], ".3f"),
                     _fmt(t["lm_loss_end"], ".3f"), _fmt(t["final_target_cr"], ".4f"),
                     _fmt(t["final_achieved_cr"], ".4f")])  # fmt: skip
    header = ["row", "zero_out steps", "retrofit steps", "finetune steps", "tokens",
              "LM loss first 5", "LM loss last 5", "final target CR", "final achieved CR"]  # fmt: skip
    return table(header, rows)


def decode_table(summary: dict) -> str:
    runs = summary["decode"]
    base = runs[0]
    rows = []
    for d in runs:
        rows.append([d["label"], f"{d['compression_ratio']:.3f}", f"{d['step_ms']:.1f}",
                     f"{d['tokens_per_s']:.1f}", f"{d['tokens_per_s'] / base['tokens_per_s']:.2f}x",
                     f"{d['kv_allocated_bytes'] / 2**20:.2f}",
                     f"{d['kv_allocated_bytes'] / base['kv_allocated_bytes']:.3f}",
                     f"{d['window_state_bytes'] / 2**20:.2f}"])  # fmt: skip
    header = ["model", "CR (held-out)", "ms/step", "tokens/s", "vs vanilla", "KV MiB",
              "KV vs vanilla", "window state MiB"]  # fmt: skip
    return table(header, rows)


def timing_table(summary: dict) -> str:
    rows = [
        [name, f"{t['wall_s']:.0f}", f"{t['cpu_s']:.0f}"] for name, t in summary["timings"].items()
    ]
    total = [sum(t[k] for t in summary["timings"].values()) for k in ("wall_s", "cpu_s")]
    rows.append(["total", f"{total[0]:.0f}", f"{total[1]:.0f}"])
    return table(["step", "wall s", "CPU s (process + children)"], rows)


def _protocols(summary: dict) -> str:
    e = summary["preset"]["eval"]
    return (
        f"ppl whole: windows of {e['window']} tokens moved by {e['stride']}, fed "
        f"{e['chunk']} tokens per call, at most {e['max_tokens']} tokens; ppl "
        f"{e['context_len']}+{e['continuation_len']}: {e['max_samples']} samples of a "
        f"{e['context_len']}-token context then {e['continuation_len']} scored tokens. "
        "Today's protocols: DMC compresses every token (continuation included); H2O/TOVA keep "
        "a fixed budget (window/CR, context/CR slots per layer and KV head), the continuation "
        "compressed only after a dense prefill and scored uncompressed. "
        f"{_matched(e)}Real CR: tokens seen / slots the last scored token attended (the recent "
        "exact tokens counted; GQA's fewer heads counted). Peak KV MiB: the most the cache "
        "held at any measured moment, prefill included. "
        f"Tasks: {e['limit']} documents each (limit)."
    )


def _matched(e: dict) -> str:
    if not any(p.startswith("matched") for p in e.get("protocols", ())):
        return ""
    return (
        f"Matched protocols (calls of {e['matched_chunk']} tokens): every method runs each "
        "window or sample from its first token and holds at most ceil(tokens seen / CR) slots "
        "per layer and KV head after every call (H2O/TOVA by eviction; DMC as it learned). "
    )


def _goals(summary: dict) -> list[str]:
    found = verdicts(summary)
    if not found:
        return []
    lines = [v.line() for v in found if v.protocol == HEADLINE]
    if lines:
        lines.insert(0, f"Headline, at equal KV slots ({HEADLINE} protocol):")
        lines.append("\nUnder the other protocols:")
    lines += [v.line() for v in found if v.protocol != HEADLINE]
    return ["## Quality goals (megatron_dmc/pipeline/goals.py)\n", "\n".join(lines) + "\n"]


def render(summary: dict, plots: dict[str, Path], root: Path) -> str:
    """The markdown report; plot paths are written relative to `root`."""
    m = summary["machine"]
    decode = summary["decode"][0]
    parts = [
        f"# DMC main job: `{summary['preset']['name']}` preset\n",
        f"`{summary['command']}` · {summary['date']} · {m['platform']}, {m['cpus']} CPUs, "
        f"torch {m['torch']}, load average at the end {m['load_average_1_5_15']}\n",
        "## Outcome\n", "\n".join(outcome_lines(summary) + gqa_outcome_lines(summary)) + "\n",
        *_goals(summary),
        "## Training (metrics.jsonl)\n", training_table(summary),
        "## Evaluation\n",
        format_markdown([ResultRow(**r) for r in summary["results"]]),
        "Perplexity on the held-out split of the embedded corpus; Δ relative to vanilla. "
        f"{_protocols(summary)} KV MiB: what the cache holds after the continuation "
        "protocol's context (DMC: its pages and window state).\n",
        f"## Decoding (paged engine, batch {decode['batch']}, {decode['context']}-token "
        "held-out prompts, process CPU time, 1 thread)\n",
        decode_table(summary),
        *headline_section(root),
        "## Plots\n",
        *(f"![{name}]({path.relative_to(root)})\n" for name, path in plots.items()),
        "## Step times\n", timing_table(summary),
        "CPU time counts this process and its finished children (training ranks, "
        "conversion workers); on a shared machine wall time also measures the neighbours.\n",
    ]  # fmt: skip
    return "\n".join(parts)
