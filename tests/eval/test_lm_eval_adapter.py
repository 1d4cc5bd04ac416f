"""lm-eval adapter: loglikelihoods equal a direct computation; local tasks render."""

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.evaluator import simple_evaluate
from lm_eval.tasks import TaskManager

from megatron_dmc.eval.eviction import H2O
from megatron_dmc.eval.lm_eval_adapter import CompressedCacheLM
from megatron_dmc.eval.task_files import ALL_TASKS, render_tasks
from tests.eval.helpers import tiny_llama, tiny_tokenizer

TOY_TASK = """task: toy
dataset_path: json
dataset_kwargs:
  data_files: {{"validation": "{data}"}}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{q}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""
DOCS = [
    {"q": "Is the fox quick?", "choices": ["yes", "no"], "label": 0},
    {"q": "Where is the man sitting?", "choices": ["on a roof", "in a dog"], "label": 0},
]


def _direct(model, tokenizer, context: str, continuation: str) -> float:
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits.float()
    logprobs_TV = torch.log_softmax(logits[0, :-1], -1)
    targets = torch.tensor(whole[len(context_ids) :])
    return float(logprobs_TV[len(context_ids) - 1 :].gather(1, targets[:, None]).sum())


def _toy_results(tmp_path, model, tokenizer, method=None):
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "toy.yaml").write_text(TOY_TASK.format(data=data))
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    lm = CompressedCacheLM(model, tokenizer, method, progress=False)
    out = simple_evaluate(
        model=lm, tasks=["toy"], task_manager=manager, bootstrap_iters=0, log_samples=True
    )
    return out["samples"]["toy"], out["results"]["toy"]["acc,none"]


def test_loglikelihood_equals_direct_computation(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    samples, acc = _toy_results(tmp_path, model, tokenizer)
    assert len(samples) == 2
    correct = 0
    for sample in samples:
        direct = [_direct(model, tokenizer, *args) for args in sample["arguments"]]
        ours = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert ours == pytest.approx(direct, abs=1e-4)
        correct += int(max(range(2), key=direct.__getitem__) == sample["target"])
    assert acc == pytest.approx(correct / 2)


def test_evicting_method_runs_through_the_harness(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    samples, _ = _toy_results(tmp_path, tiny_llama(), tiny_tokenizer(), H2O(compression_ratio=2))
    assert all(len(s["filtered_resps"]) == 2 for s in samples)


def test_generate_until_stops_at_the_stop_string():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    lm = CompressedCacheLM(model, tokenizer, H2O(compression_ratio=2), progress=False)

    class Request:
        args = ("The quick brown fox", {"until": ["\n\n"], "max_gen_toks": 6})

    (text,) = lm.generate_until([Request()])
    assert isinstance(text, str) and "\n\n" not in text


def test_rendered_tasks_point_at_local_files(tmp_path):
    out = render_tasks(tmp_path)
    for task in ALL_TASKS:
        assert (out / f"{task}.yaml").is_file()
    piqa = (out / "piqa.yaml").read_text()
    path = json.loads(piqa.split("data_files: ")[1])["validation"][0]
    assert path.endswith(".arrow") and (tmp_path / "utils.py").is_file()
    assert len(list(out.glob("mmlu_*.yaml"))) == 57
