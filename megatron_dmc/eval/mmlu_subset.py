"""A fixed, seeded MMLU subset: N test questions of each of the 57 subjects, 5-shot.

The full run scores all 14,042 test questions (`--tasks mmlu --limit 0`, hours on a CPU);
the subset scores `per_subject` questions drawn per subject by a seeded shuffle of its
test split (`random.Random(f"{seed}-{subject}")`), so the same questions every run and
for every method, and a larger N keeps the smaller N's questions. The few-shot examples
stay the subject's 5 dev questions, in order; the score is accuracy over all scored
questions (subjects weighted by how many they contribute, i.e. equally).
"""

from __future__ import annotations

import random

MMLU_SEED = 1234
"""Seed of the per-subject question draw."""


def _test_rows() -> dict[str, int]:
    import pyarrow.ipc as ipc

    from megatron_dmc.assets.eval_data import eval_data_files, mmlu_subjects

    files = eval_data_files("mmlu", "test")
    return {s: ipc.open_stream(str(f)).read_all().num_rows for s, f in zip(mmlu_subjects(), files)}


def mmlu_subset(per_subject: int, seed: int = MMLU_SEED) -> dict[str, list[int]]:
    """{`mmlu_<subject>`: sorted test-question indices}, `per_subject` of each subject
    (all of a subject that has fewer); lm-eval's `samples` argument."""
    if per_subject < 1:
        raise ValueError(f"per_subject must be >= 1 questions; got {per_subject}")
    subset = {}
    for subject, rows in _test_rows().items():
        order = list(range(rows))
        random.Random(f"{seed}-{subject}").shuffle(order)
        subset[f"mmlu_{subject}"] = sorted(order[:per_subject])
    return subset
