"""The results tables: method x CR x perplexity per protocol (with the real CR and the peak
KV bytes of each) x task accuracy x KV bytes, as JSON (for the report) and markdown.
Changes are relative to the `vanilla` row."""

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
    ppl_matched_strided: float | None = None
    ppl_matched_continuation: float | None = None
    kv_bytes: int | None = None
    """Bytes the cache holds after the continuation protocol's context."""
    dense_kv_bytes: int | None = None
    """A dense cache of the original model for the same context."""
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    """{task: {"acc": .., "acc_norm": ..}}."""
    settings: dict = field(default_factory=dict)
    real_cr: dict[str, float] = field(default_factory=dict)
    """Per protocol: tokens seen / KV slots the last scored token attended, against the
    original model's KV heads (a GQA model's fewer heads count)."""
    peak_kv_bytes: dict[str, int] = field(default_factory=dict)
    """Per protocol: the most KV bytes the cache held at any measured moment."""
    task_details: dict = field(default_factory=dict)
    """Generation tasks' per-problem / per-sample records: {"humaneval": .., "needle": ..}."""


def make_row(
    method: str,
    compression_ratio: float,
    results: list[PerplexityResult] = (),
    tasks: dict[str, dict[str, float]] | None = None,
    dense_kv_bytes: int | None = None,
) -> ResultRow:
    """A row from the protocol results; `dense_kv_bytes` (the original model's cache of the
    continuation context) overrides the model's own (GQA)."""
    row = ResultRow(method, compression_ratio, tasks=dict(tasks or {}))
    by_protocol = {result.protocol: result for result in results}
    continuation = by_protocol.get("continuation")
    heads = 1.0
    if continuation is not None:
        row.kv_bytes = continuation.kv_bytes
        row.dense_kv_bytes = dense_kv_bytes or continuation.dense_kv_bytes
        heads = row.dense_kv_bytes / continuation.dense_kv_bytes
    elif dense_kv_bytes is not None:
        row.dense_kv_bytes = dense_kv_bytes
    for protocol, result in by_protocol.items():
        setattr(row, f"ppl_{protocol}", result.perplexity)
        row.settings[protocol] = result.settings
        row.peak_kv_bytes[protocol] = result.peak_kv_bytes
        if result.real_cr is not None:
            row.real_cr[protocol] = result.real_cr * heads
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


TODAY = ("strided", "continuation")
MATCHED = ("matched_strided", "matched_continuation")
PROTOCOL_TITLES = {
    TODAY: "Perplexity, today's protocols: whole-sequence with a fixed budget of window/CR "
    "slots (every token held until it fills); continuation: compress after a dense prefill, "
    "continuation uncompressed",
    MATCHED: "Perplexity, matched protocols: every method runs the whole sample in chunks and "
    "holds at most ceil(tokens seen / CR) KV slots at every chunk boundary",
}


def _ppl_header(rows: list[ResultRow], protocol: str) -> str:
    if protocol.endswith("strided"):
        return "ppl whole"
    for row in rows:
        s = row.settings.get(protocol)
        if s:
            return f"ppl {s['context_len']}+{s['continuation_len']}"
    return "ppl continuation"


def _ppl_cells(row: ResultRow, base: ResultRow | None, protocol: str) -> list[str]:
    value = getattr(row, f"ppl_{protocol}")
    peak = row.peak_kv_bytes.get(protocol)
    return [
        _num(value, ".3f"),
        _change(value, base and getattr(base, f"ppl_{protocol}")),
        _num(row.real_cr.get(protocol), ".2f"),
        _num(None if peak is None else peak / 2**20, ".2f"),
    ]


def perplexity_table(rows: list[ResultRow], protocols: tuple[str, ...]) -> str | None:
    """Perplexity, Δ, real CR and peak KV MiB per protocol; None where no row measured any."""
    shown = [p for p in protocols if any(getattr(r, f"ppl_{p}") is not None for r in rows)]
    if not shown:
        return None
    base = next((r for r in rows if r.method == "vanilla"), None)
    header = ["method", "CR"]
    for protocol in shown:
        header += [_ppl_header(rows, protocol), "Δ", "real CR", "peak KV MiB"]
    body = []
    for row in rows:
        cells = [row.method, f"{row.compression_ratio:g}x"]
        body.append(cells + [c for p in shown for c in _ppl_cells(row, base, p)])
    return _table(header, body)


def tasks_table(rows: list[ResultRow], metric: str = "acc") -> str:
    """Task accuracy in % (`metric`, `acc` where a task lacks it), the common-sense average,
    and the KV bytes held after the continuation protocol's context."""
    tasks = _task_names(rows)
    header = ["method", "CR", *tasks, "CS avg", "KV MiB", "dense/KV"]
    body = []
    for row in rows:
        cells = [row.method, f"{row.compression_ratio:g}x"]
        for value in [*(_acc(row, t, metric) for t in tasks), _commonsense_mean(row, metric)]:
            cells.append(_num(None if value is None else 100 * value, ".1f"))
        kv, dense = row.kv_bytes, row.dense_kv_bytes
        cells.append(_num(None if kv is None else kv / 2**20, ".2f"))
        cells.append(f"{dense / kv:.2f}x" if kv and dense else "–")
        body.append(cells)
    return _table(header, body)


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body]) + "\n"


def format_markdown(rows: list[ResultRow], metric: str = "acc") -> str:
    """The perplexity tables (today's protocols, then the matched ones where measured), each
    under its title, then the tasks table."""
    parts = []
    for protocols, title in PROTOCOL_TITLES.items():
        table = perplexity_table(rows, protocols)
        if table is not None:
            parts += [f"**{title}.**\n", table]
    parts += ["**Tasks and KV bytes after the continuation context.**\n", tasks_table(rows, metric)]
    return "\n".join(parts)


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
