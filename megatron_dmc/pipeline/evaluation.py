"""The evaluation step: every method on the same held-out tokens and tasks, one row each.

Rows: the original model (vanilla), each trained export (DMC or DMS) at its target, H2O and TOVA at each
target on the original model, and optionally the mean-pooled GQA model, as pooled and
after uptraining. Each row is
saved as soon as it is measured (`eval/<row>.json`), so an interrupted step resumes at
the next row; `eval/results.md` and `results.json` hold the table.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_dmc.eval.results import ResultRow, load_results, write_results
from megatron_dmc.pipeline.layout import cr_tag, row_key
from megatron_dmc.pipeline.preset import EvalPreset


@dataclass(frozen=True)
class EvalJob:
    """One row to measure: a model directory with a KV method at a ratio."""

    key: str
    """File stem of the row, e.g. `dmc_2x`."""
    model_dir: str
    method: str
    compression_ratio: float
    label: str | None = None
    """The row's name in the table (default: the method)."""


def eval_jobs(
    source_dir: str,
    exports: dict[tuple[str, float], Path],
    settings: EvalPreset,
    gqa_dir: Path | None = None,
    gqa_cr: float | None = None,
    gqa_uptrained_dir: Path | None = None,
) -> list[EvalJob]:
    """The rows of the table, vanilla first; `exports` is {(KV method, target CR): HF dir}.
    Per target: each trained row (labelled by its KV method; DMS exports run through the
    same engine, their config says how), then the baselines."""
    jobs = [EvalJob("vanilla", source_dir, "vanilla", 1.0)]
    for cr in sorted({cr for _, cr in exports}):
        for (method, row_cr), export in exports.items():
            if row_cr == cr:
                jobs.append(EvalJob(row_key(method, cr), str(export), "dmc", cr, method))
        jobs += [EvalJob(f"{b}_{cr_tag(cr)}", source_dir, b, cr) for b in settings.baselines]
    if gqa_dir is not None and gqa_cr is not None:
        tag = cr_tag(gqa_cr)
        jobs.append(EvalJob(f"gqa_{tag}", str(gqa_dir), "gqa", gqa_cr, "gqa-pooled"))
        if gqa_uptrained_dir is not None:
            key, label = f"gqa_uptrained_{tag}", "gqa-uptrained"
            jobs.append(EvalJob(key, str(gqa_uptrained_dir), "gqa", gqa_cr, label))
    return jobs


def eval_settings(settings: EvalPreset):
    from megatron_dmc.eval.run import EvalSettings

    return EvalSettings(
        context_len=settings.context_len,
        continuation_len=settings.continuation_len,
        max_samples=settings.max_samples,
        window=settings.window,
        stride=settings.stride,
        chunk=settings.chunk,
        max_tokens=settings.max_tokens,
        protocols=tuple(settings.protocols),
        matched_chunk=settings.matched_chunk,
        tasks=tuple(settings.tasks),
        limit=settings.limit,
    )


def evaluate_row(
    job: EvalJob, token_ids: torch.Tensor, settings: EvalPreset, dense_kv_bytes: int | None
) -> ResultRow:
    """Load the job's model and measure it (the tokenizer is the model directory's)."""
    from megatron_dmc.eval.methods import build_method, load_model, load_tokenizer
    from megatron_dmc.eval.run import evaluate

    model, tokenizer = load_model(job.model_dir), load_tokenizer(job.model_dir)
    method = build_method(job.method, job.compression_ratio)
    return evaluate(model, tokenizer, method, token_ids, eval_settings(settings), dense_kv_bytes)


def run_evaluation(
    jobs: list[EvalJob], token_ids: torch.Tensor, settings: EvalPreset, out_dir: Path
) -> list[ResultRow]:
    """Measure every row not yet on disk, then write the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[ResultRow] = []
    for index, job in enumerate(jobs, 1):
        path = out_dir / f"{job.key}.json"
        if not path.is_file():
            print(f"-- eval {index}/{len(jobs)}: {job.key} ({job.model_dir})", flush=True)
            dense = rows[0].dense_kv_bytes if job.method == "gqa" and rows else None
            row = evaluate_row(job, token_ids, settings, dense)
            row.method = job.label or job.method
            path.write_text(json.dumps(dataclasses.asdict(row), indent=2) + "\n")
        rows += load_results(path)
    write_results(rows, out_dir)
    return rows
