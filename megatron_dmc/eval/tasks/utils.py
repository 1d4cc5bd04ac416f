"""Document processing for the local task YAMLs (lm-eval `!function` targets).

Evaluation documents are shuffled with a fixed seed so that `--limit N` scores a random
subsample of N; a full run scores the same documents in another order.
"""

from __future__ import annotations

import re

SEED = 1234


def shuffled(dataset):
    return dataset.shuffle(seed=SEED)


def _clean_hellaswag(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_doc(doc: dict) -> dict:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": _clean_hellaswag(doc["activity_label"] + ": " + context),
        "choices": [_clean_hellaswag(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def process_hellaswag(dataset):
    return shuffled(dataset).map(_hellaswag_doc)


def winogrande_gold(doc: dict) -> int:
    """Index of the right option; its filled-in prefix is the context to score from."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_contexts(doc: dict) -> list[str]:
    """The sentence up to the blank, with each option filled in."""
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def winogrande_continuation(doc: dict) -> str:
    """The sentence after the blank, scored after each filled-in context."""
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()
