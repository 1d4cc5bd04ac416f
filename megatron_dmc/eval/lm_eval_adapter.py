"""lm-evaluation-harness adapter: scores and generates through a KV method's cache.

Every request runs its context through a fresh cache of the method (DMC: the compressed
cache; H2O/TOVA: the evicted cache with budget = context / CR; vanilla, GQA: dense), then
scores the continuation against what the cache kept — the code of the continuation
perplexity protocol (scoring.py). Continuations that share a context share one prefill.

    lm_eval --model megatron_dmc --model_args pretrained=DIR,method=h2o,cr=2 \
        --include_path "$(python -m megatron_dmc.eval tasks-dir)" --tasks piqa --limit 100
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from torch import nn
from tqdm import tqdm

from megatron_dmc.eval.caches import KVMethod
from megatron_dmc.eval.methods import build_method, load_model, load_tokenizer, offline
from megatron_dmc.eval.scoring import greedy_generate, prefill, score
from megatron_dmc.eval.task_files import ALL_TASKS, render_tasks


@register_model("megatron_dmc")
class CompressedCacheLM(LM):
    """An lm-eval `LM` over an HF causal LM and a KV method (batch size 1, CPU or GPU)."""

    def __init__(
        self,
        model: nn.Module | str,
        tokenizer=None,
        method: KVMethod | None = None,
        prefill_chunk: int | None = None,
        max_length: int | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if tokenizer is None and not isinstance(model, str):
            raise ValueError("pass the tokenizer with a model object (or a model directory)")
        self.model = load_model(model) if isinstance(model, str) else model.eval()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        self.method = method or build_method("vanilla")
        self.prefill_chunk, self.progress = prefill_chunk, progress
        self.max_length = max_length or self.model.config.max_position_embeddings
        prefix_id = self.tokenizer.bos_token_id
        self.prefix_id = prefix_id if prefix_id is not None else self.tokenizer.eos_token_id

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """`pretrained=DIR[,method=NAME][,cr=RATIO][,prefill_chunk=N][,max_length=N]`."""
        args = lm_utils.simple_parse_args_string(arg_string)
        if "pretrained" not in args:
            raise ValueError("model_args needs pretrained=<HF model directory>")
        method = build_method(str(args.get("method", "vanilla")), float(args.get("cr", 1.0)))
        chunk, max_length = args.get("prefill_chunk"), args.get("max_length")
        return cls(
            str(args["pretrained"]),
            method=method,
            prefill_chunk=int(chunk) if chunk else None,
            max_length=int(max_length) if max_length else None,
        )

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.prefix_id], self._encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, context_ids = self._encode(context + continuation), self._encode(context)
        return context_ids, whole[len(context_ids) :]

    def _score_group(self, context: list[int], continuations: list[list[int]]) -> list[tuple]:
        keep = self.max_length - max(len(c) for c in continuations)
        if keep < 1:
            raise ValueError(f"a continuation is longer than max_length={self.max_length}")
        prefix = prefill(self.model, self.method, torch.tensor(context[-keep:]), self.prefill_chunk)
        results = []
        for i, continuation in enumerate(continuations):
            own = prefix if i == len(continuations) - 1 else copy.deepcopy(prefix)
            scored = score(self.model, own, torch.tensor(continuation))
            results.append((float(scored.logprobs_T.sum()), bool(scored.greedy_T.all())))
        return results

    def _loglikelihood_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (context, _) in enumerate(pairs):
            groups[tuple(context)].append(i)
        results: list[tuple | None] = [None] * len(pairs)
        for context, idx in tqdm(groups.items(), desc="loglikelihood", disable=not self.progress):
            for i, res in zip(idx, self._score_group(list(context), [pairs[i][1] for i in idx])):
                results[i] = res
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation, whether greedy decoding produces it)."""
        return self._loglikelihood_tokens([self._encode_pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of whole strings, in disjoint windows of max_length tokens."""
        out = []
        for request in requests:
            windows = lm_utils.get_rolling_token_windows(
                self._encode(request.args[0]), self.prefix_id, self.max_length, 1
            )
            pairs = [lm_utils.make_disjoint_window(w) for w in windows]
            out.append(sum(logprob for logprob, _ in self._loglikelihood_tokens(pairs)))
        return out

    def _stopper(self, until: list[str]):
        eos = self.tokenizer.eos_token_id

        def stop(tokens: list[int]) -> bool:
            text = self.tokenizer.decode(tokens)
            return tokens[-1] == eos or any(s in text for s in until)

        return stop

    def generate_until(self, requests) -> list[str]:
        """Greedy generation through the method's cache, cut at the first stop string."""
        out = []
        for request in tqdm(requests, desc="generate", disable=not self.progress):
            context, kwargs = request.args
            until = kwargs.get("until") or [self.tokenizer.eos_token]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            context_ids = self._encode(context)[-(self.max_length - max_new) :] or [self.prefix_id]
            prefix = prefill(self.model, self.method, torch.tensor(context_ids), self.prefill_chunk)
            tokens = greedy_generate(self.model, prefix, max_new, self._stopper(until))
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            for s in until:
                text = text.split(s)[0]
            out.append(text)
        return out


def run_tasks(
    model: nn.Module,
    tokenizer,
    method: KVMethod | None = None,
    tasks: tuple[str, ...] | list[str] = ALL_TASKS,
    limit: int | None = None,
    num_fewshot: int | None = None,
    prefill_chunk: int | None = None,
    samples: dict[str, list[int]] | None = None,
) -> dict[str, dict[str, float]]:
    """Score the local tasks; {task: {metric: value}} (acc, acc_norm where defined).

    `limit` scores the first N documents of each task after a fixed shuffle (per MMLU
    subject: N of each of the 57); None scores all. `num_fewshot` None keeps each task's
    own (0, MMLU 5). `samples` ({task: doc indices}, e.g. `mmlu_subset.mmlu_subset`)
    scores exactly those documents instead of `limit`.
    """
    offline()
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    unknown = sorted(set(tasks) - set(ALL_TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {', '.join(ALL_TASKS)}")
    lm = CompressedCacheLM(model, tokenizer, method, prefill_chunk)
    manager = TaskManager(include_path=str(render_tasks()), include_defaults=False)
    out = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=None if samples else limit,
        samples=samples,
        task_manager=manager,
        bootstrap_iters=0,
        log_samples=False,
    )
    return {task: _metrics(values) for task, values in out["results"].items() if task in tasks}


def _metrics(values: dict) -> dict[str, float]:
    picked = {}
    for key, value in values.items():
        metric, _, filt = key.partition(",")
        if metric in ("acc", "acc_norm") and filt in ("none", ""):
            picked[metric] = float(value)
    return picked
