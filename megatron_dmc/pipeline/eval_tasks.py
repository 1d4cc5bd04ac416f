"""The task step: HumanEval pass@1, MMLU 5-shot (seeded subset) and long-context retrieval
for every row of the evaluation step (same models, methods and ratios), through each
method's cache. One JSON row per method in `eval_tasks/<row>.json` (with per-problem and
per-sample records), written as soon as it is measured so an interrupted step resumes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from megatron_dmc.eval.needle import NEEDLE_TASKS
from megatron_dmc.eval.results import ResultRow, load_results

TASKS_DIR = "eval_tasks"
"""Subdirectory of the job's output directory."""


@dataclass
class PaperTasks:
    """The paper's tasks in the main job (all off by default)."""

    humaneval_limit: int | None = None
    """HumanEval: the first N problems (0: all 164; None: skip HumanEval)."""
    humaneval_max_new_tokens: int = 384
    """HumanEval: greedy tokens at most per completion."""
    mmlu_per_subject: int | None = None
    """MMLU 5-shot on N seeded questions per subject (None: skip MMLU)."""
    needle_lengths: list[int] = field(default_factory=list)
    """Retrieval context lengths in tokens (empty: skip retrieval)."""
    needle_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Retrieval: needle depths in [0, 1]."""
    needle_tasks: list[str] = field(default_factory=lambda: list(NEEDLE_TASKS))
    """Retrieval: passkey, multikey, vartrack."""
    needle_samples: int = 1
    """Retrieval: samples per (task, length, depth)."""
    needle_prefill_chunk: int = 512
    """Retrieval: prompt tokens per forward call."""

    def __post_init__(self) -> None:
        if self.tasks:
            self.eval_settings()  # refuses bad lengths, depths or task names now

    @property
    def tasks(self) -> tuple[str, ...]:
        picked = [
            ("humaneval", self.humaneval_limit is not None),
            ("mmlu", self.mmlu_per_subject is not None),
            ("needle", bool(self.needle_lengths)),
        ]
        return tuple(name for name, on in picked if on)

    def eval_settings(self):
        """The library's settings (no perplexity; only these tasks)."""
        from megatron_dmc.eval.humaneval import HumanEvalSettings
        from megatron_dmc.eval.needle import NeedleSettings
        from megatron_dmc.eval.run import EvalSettings

        needle = NeedleSettings(
            tasks=tuple(self.needle_tasks), lengths=tuple(self.needle_lengths or [1024]),
            depths=tuple(self.needle_depths), samples=self.needle_samples,
            prefill_chunk=self.needle_prefill_chunk,
        )  # fmt: skip
        humaneval = HumanEvalSettings(
            limit=self.humaneval_limit or None, max_new_tokens=self.humaneval_max_new_tokens
        )
        return EvalSettings(
            tasks=self.tasks, protocols=(), mmlu_per_subject=self.mmlu_per_subject,
            humaneval=humaneval, needle=needle,
        )  # fmt: skip


def run_task_evaluation(jobs: list, tasks: PaperTasks, out_dir: Path) -> list[ResultRow]:
    """Measure the tasks for every evaluation job (`evaluation.EvalJob`) not yet on disk."""
    import torch

    from megatron_dmc.eval.methods import build_method, load_model, load_tokenizer
    from megatron_dmc.eval.run import evaluate

    out_dir.mkdir(parents=True, exist_ok=True)
    settings, rows = tasks.eval_settings(), []
    for index, job in enumerate(jobs, 1):
        path = out_dir / f"{job.key}.json"
        if not path.is_file():
            print(f"-- tasks {index}/{len(jobs)}: {job.key} ({', '.join(tasks.tasks)})", flush=True)
            model, tokenizer = load_model(job.model_dir), load_tokenizer(job.model_dir)
            method = build_method(job.method, job.compression_ratio)
            row = evaluate(model, tokenizer, method, torch.zeros(0), settings)
            row.method = job.label or job.method
            path.write_text(json.dumps(dataclasses.asdict(row), indent=2) + "\n")
        rows += load_results(path)
    return rows
