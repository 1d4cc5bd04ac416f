"""The task step's settings and its report section (no model is run)."""

from __future__ import annotations

import json

import pytest

from megatron_dmc.eval.results import ResultRow
from megatron_dmc.pipeline import load_preset
from megatron_dmc.pipeline.eval_tasks import TASKS_DIR, PaperTasks
from megatron_dmc.pipeline.layout import RunLayout
from megatron_dmc.pipeline.report_tasks import HEATMAP_FILE, extend_report


def test_paper_tasks_pick_what_is_configured_and_refuse_bad_values():
    assert PaperTasks().tasks == ()
    tasks = PaperTasks(humaneval_limit=0, mmlu_per_subject=1, needle_lengths=[1024])
    assert tasks.tasks == ("humaneval", "mmlu", "needle")
    settings = tasks.eval_settings()
    assert settings.humaneval.limit is None and settings.mmlu_per_subject == 1
    assert settings.protocols == () and settings.needle.lengths == (1024,)
    with pytest.raises(ValueError, match="depths"):
        PaperTasks(needle_lengths=[1024], needle_depths=[2.0])


def test_full_preset_runs_the_paper_tasks():
    assert set(load_preset("full").paper_tasks.tasks) == {"humaneval", "mmlu", "needle"}


def _row(method: str, cr: float, acc: float) -> ResultRow:
    grid = {"passkey": {"1024": {"0.0": acc, "1.0": 1.0}, "2048": {"0.0": 0.0, "1.0": acc}}}
    records = [{"task_id": "HumanEval/0", "passed": acc > 0.5}]
    details = {
        "humaneval": {"pass@1": acc, "problems": 1, "per_problem": records, "sandbox": {}},
        "needle": {"acc": acc, "acc_by_task": {"passkey": acc}, "grid": grid, "settings": {}},
    }
    tasks = {"mmlu": {"acc": 0.25}, "humaneval": {"pass@1": acc}, "needle": {"acc": acc}}
    return ResultRow(method, cr, tasks=tasks, task_details=details)


def test_extend_report_adds_table_summary_and_heatmap(tmp_path):
    layout = RunLayout(tmp_path)
    (tmp_path / TASKS_DIR).mkdir()
    for key, row in {"vanilla": _row("vanilla", 1.0, 1.0), "h2o_2x": _row("h2o", 2.0, 0.5)}.items():
        (tmp_path / TASKS_DIR / f"{key}.json").write_text(json.dumps(row.__dict__))
    layout.summary.write_text(json.dumps({"command": "x"}))
    layout.report.write_text("# report\n")
    extend_report(layout)
    summary = json.loads(layout.summary.read_text())
    assert [s["label"] for s in summary["paper_tasks"]] == ["vanilla", "h2o 2x"]
    assert summary["paper_tasks"][1]["humaneval"]["pass@1"] == 0.5
    text = layout.report.read_text()
    assert "| vanilla | 1x | 100.0 (1 problems) | 25.0 | 100.0 | 100.0 |" in text
    assert "| h2o 2x | 2x | 50.0 (1 problems) | 25.0 | 50.0 | 50.0 |" in text
    assert (layout.plots_dir / HEATMAP_FILE).is_file() and HEATMAP_FILE in text


def test_extend_report_without_the_task_step_changes_nothing(tmp_path):
    layout = RunLayout(tmp_path)
    layout.summary.write_text("{}")
    layout.report.write_text("# report\n")
    extend_report(layout)
    assert layout.report.read_text() == "# report\n" and layout.summary.read_text() == "{}"


@pytest.mark.slow
def test_task_step_writes_one_row_per_job_and_resumes(tmp_path, monkeypatch):
    from megatron_dmc.pipeline import eval_tasks
    from megatron_dmc.pipeline.evaluation import EvalJob
    from tests.eval.helpers import tiny_llama, tiny_tokenizer

    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    jobs = [
        EvalJob("vanilla", str(model_dir), "vanilla", 1.0),
        EvalJob("h2o_2x", str(model_dir), "h2o", 2.0),
    ]
    tasks = PaperTasks(humaneval_limit=1, humaneval_max_new_tokens=4, needle_lengths=[300],
                       needle_depths=[0.5], needle_tasks=["passkey"], needle_prefill_chunk=64)  # fmt: skip
    rows = eval_tasks.run_task_evaluation(jobs, tasks, tmp_path / TASKS_DIR)
    assert [r.method for r in rows] == ["vanilla", "h2o"]
    assert all(set(r.tasks) == {"humaneval", "needle"} for r in rows)
    assert rows[1].task_details["humaneval"]["problems"] == 1
    monkeypatch.setattr("megatron_dmc.eval.methods.load_model", lambda p: pytest.fail("rerun"))
    assert len(eval_tasks.run_task_evaluation(jobs, tasks, tmp_path / TASKS_DIR)) == 2
