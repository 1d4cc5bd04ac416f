"""The task step's part of the report: HumanEval pass@1, MMLU 5-shot (subset) and the
retrieval accuracy per method, a heat map of retrieval accuracy over length and depth, and
the same numbers in `summary.json` under "paper_tasks" (per-problem records stay in
`eval_tasks/<row>.json`).
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_dmc.eval.results import ResultRow, load_results
from megatron_dmc.pipeline.eval_tasks import TASKS_DIR
from megatron_dmc.pipeline.layout import RunLayout, cr_tag

HEATMAP_FILE = "needle_heatmap.png"


def label(row: ResultRow) -> str:
    return (
        row.method if row.method == "vanilla" else f"{row.method} {cr_tag(row.compression_ratio)}"
    )


def task_summary(row: ResultRow) -> dict:
    """One method's task numbers (no per-problem records, except HumanEval's pass list)."""
    out: dict = {"method": row.method, "compression_ratio": row.compression_ratio}
    if "mmlu" in row.tasks:
        out["mmlu_acc"] = row.tasks["mmlu"].get("acc")
    humaneval = row.task_details.get("humaneval")
    if humaneval:
        passed = {r["task_id"]: r["passed"] for r in humaneval["per_problem"]}
        out["humaneval"] = {"pass@1": humaneval["pass@1"], "problems": humaneval["problems"],
                            "passed": passed, "sandbox": humaneval["sandbox"]}  # fmt: skip
    needle = row.task_details.get("needle")
    if needle:
        keys = ("acc", "acc_by_task", "grid")
        out["needle"] = {k: needle[k] for k in keys} | {"settings": needle["settings"]}
    return out


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def markdown(summaries: list[dict], heatmap: Path | None, root: Path) -> str:
    """The report section: one table row per method, then the heat map."""
    needle_tasks = sorted(
        {t for s in summaries for t in s.get("needle", {}).get("acc_by_task", {})}
    )
    header = ["method", "CR", "HumanEval pass@1", "MMLU 5-shot", "retrieval", *needle_tasks]
    lines = ["## HumanEval, MMLU and long-context retrieval", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
    for s in summaries:
        he, needle = s.get("humaneval"), s.get("needle", {})
        he_cell = "–" if he is None else f"{_pct(he['pass@1'])} ({he['problems']} problems)"
        by_task = needle.get("acc_by_task", {})
        cells = [s["method"], f"{s['compression_ratio']:g}x", he_cell, _pct(s.get("mmlu_acc")),
                 _pct(needle.get("acc")), *(_pct(by_task.get(t)) for t in needle_tasks)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Accuracy in %; every method had the same prompts and the same KV budget.")
    if heatmap is not None:
        lines += ["", f"![Retrieval accuracy by length and depth]({heatmap.relative_to(root)})"]
    return "\n".join(lines) + "\n"


def plot_needle_heatmap(rows: list[ResultRow], path: Path) -> Path | None:
    """Retrieval accuracy, one panel per (method, task): depth (rows) x length (columns)."""
    grids = [
        (label(r), r.task_details["needle"]["grid"]) for r in rows if "needle" in r.task_details
    ]
    if not grids:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for _, g in grids for t in g})
    fig, axes = plt.subplots(len(grids), len(tasks), squeeze=False,
                             figsize=(3.2 * len(tasks), 2.4 * len(grids)))  # fmt: skip
    for i, (name, grid) in enumerate(grids):
        for j, task in enumerate(tasks):
            _panel(axes[i][j], grid.get(task, {}), f"{name}: {task}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panel(ax, by_length: dict, title: str) -> None:
    lengths = sorted(by_length, key=int)
    depths = sorted({d for v in by_length.values() for d in v}, key=float)
    acc_DL = [[by_length[n].get(d, float("nan")) for n in lengths] for d in depths]
    ax.imshow(acc_DL, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), lengths, fontsize=7)
    ax.set_yticks(range(len(depths)), depths, fontsize=7)
    ax.set_xlabel("context tokens", fontsize=7)
    ax.set_ylabel("depth", fontsize=7)
    ax.set_title(title, fontsize=8)
    for y, row in enumerate(acc_DL):
        for x, value in enumerate(row):
            ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=6)


def extend_report(layout: RunLayout) -> None:
    """Add the task results to summary.json and report.md (no-op without the task step)."""
    tasks_dir = layout.root / TASKS_DIR
    paths = sorted(tasks_dir.glob("*.json")) if tasks_dir.is_dir() else []
    rows = [row for path in paths for row in load_results(path)]
    if not rows:
        return
    order = {"vanilla": 0}
    rows.sort(key=lambda r: (order.get(r.method, 1), r.compression_ratio, r.method))
    summaries = [task_summary(r) | {"label": label(r)} for r in rows]
    summary = json.loads(layout.summary.read_text())
    summary["paper_tasks"] = summaries
    layout.summary.write_text(json.dumps(summary, indent=2) + "\n")
    heatmap = plot_needle_heatmap(rows, layout.plots_dir / HEATMAP_FILE)
    table = [s | {"method": s["label"]} for s in summaries]
    with layout.report.open("a") as report:
        report.write("\n" + markdown(table, heatmap, layout.root))
