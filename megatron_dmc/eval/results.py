"""The results table: method x CR x perplexity (both protocols) x task accuracy x KV bytes,
as JSON (for the report) and markdown. Changes are relative to the `vanilla` row."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_dmc.eval.perplexity import PerplexityResult
from megatron_dmc.eval.task_files import COMMONSENSE_TASKS


@dataclass
class ResultRow:
    """One evaluated (method, compression ratio)."""

    method: str
    compression_ratio: float
    ppl_strided: float | None = None
    ppl_continuation: float | None = None
    kv_bytes: int | None = None
    """Bytes the cache holds after the continuation protocol's context."""
    dense_kv_bytes: int | None = None
    """A dense cache of the original model for the same context."""
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    """{task: {"acc": .., "acc_norm": ..}}."""
    settings: dict = field(default_factory=dict)
    task_details: dict = field(default_factory=dict)
    """Generation tasks' per-problem / per-sample records: {"humaneval": .., "needle": ..}."""


def make_row(
    method: str,
    compression_ratio: float,
    strided: PerplexityResult | None = None,
    continuation: PerplexityResult | None = None,
    tasks: dict[str, dict[str, float]] | None = None,
    dense_kv_bytes: int | None = None,
) -> ResultRow:
    """A row from the protocol results; `dense_kv_bytes` overrides the model's own (GQA)."""
    row = ResultRow(method, compression_ratio, tasks=dict(tasks or {}))
    for result in (strided, continuation):
        if result is not None:
            setattr(row, f"ppl_{result.protocol}", result.perplexity)
            row.settings[result.protocol] = result.settings
    if continuation is not None:
        row.kv_bytes = continuation.kv_bytes
        row.dense_kv_bytes = dense_kv_bytes or continuation.dense_kv_bytes
    return row


def _change(value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return "–"
    return f"{100 * (value / base - 1):+.1f}%"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _task_names(rows: list[ResultRow]) -> list[str]:
    seen = {t for row in rows for t in row.tasks}
    ordered = [t for t in (*COMMONSENSE_TASKS, "mmlu") if t in seen]
    return ordered + sorted(seen - set(ordered))


def _acc(row: ResultRow, task: str, metric: str) -> float | None:
    """`metric` of the task, or its plain accuracy where the task has no such metric."""
    values = row.tasks.get(task)
    return None if values is None else values.get(metric, values.get("acc"))


def _commonsense_mean(row: ResultRow, metric: str) -> float | None:
    accs = [_acc(row, t, metric) for t in COMMONSENSE_TASKS]
    accs = [a for a in accs if a is not None]
    return sum(accs) / len(accs) if accs else None


def _cells(row: ResultRow, base: ResultRow | None, tasks: list[str], metric: str) -> list[str]:
    kv = row.kv_bytes
    cells = [
        row.method,
        f"{row.compression_ratio:g}x",
        _num(row.ppl_strided, ".3f"),
        _change(row.ppl_strided, base and base.ppl_strided),
        _num(row.ppl_continuation, ".3f"),
        _change(row.ppl_continuation, base and base.ppl_continuation),
    ]
    for value in [*(_acc(row, t, metric) for t in tasks), _commonsense_mean(row, metric)]:
        cells.append(_num(None if value is None else 100 * value, ".1f"))
    cells.append(_num(None if kv is None else kv / 2**20, ".2f"))
    dense = row.dense_kv_bytes
    cells.append(f"{dense / kv:.2f}x" if kv and dense else "–")
    return cells


def format_markdown(rows: list[ResultRow], metric: str = "acc") -> str:
    """The table; task columns show `metric` in % (`acc` where a task lacks it), 'CS avg'
    averages the common-sense tasks."""
    base = next((r for r in rows if r.method == "vanilla"), None)
    tasks = _task_names(rows)
    header = ["method", "CR", "ppl whole", "Δ", "ppl 1024+128", "Δ", *tasks, "CS avg"]
    header += ["KV MiB", "dense/KV"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cells(row, base, tasks, metric)) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[ResultRow], out_dir: str | Path, stem: str = "results") -> Path:
    """Write `<stem>.json` and `<stem>.md` into out_dir; returns the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    markdown = out / f"{stem}.md"
    markdown.write_text(format_markdown(rows))
    return markdown


def load_results(path: str | Path) -> list[ResultRow]:
    """Rows from a JSON file written by `write_results` (a list) or one row (a dict)."""
    data = json.loads(Path(path).read_text())
    return [ResultRow(**item) for item in (data if isinstance(data, list) else [data])]
