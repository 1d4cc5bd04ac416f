"""The MMLU subset: N seeded questions per subject, and lm-eval scores exactly those."""

from __future__ import annotations

import pytest

from megatron_dmc.assets.eval_data import eval_data_root
from megatron_dmc.eval.mmlu_subset import _test_rows, mmlu_subset

try:
    eval_data_root()
except ValueError:
    pytest.skip("the evaluation data package is not installed", allow_module_level=True)


def test_subset_is_seeded_nested_and_in_range():
    rows = _test_rows()
    two, three = mmlu_subset(2), mmlu_subset(3)
    assert len(two) == 57 and two == mmlu_subset(2)
    for name, indices in two.items():
        assert len(indices) == 2 and len(set(indices)) == 2
        assert all(0 <= i < rows[name.removeprefix("mmlu_")] for i in indices)
        assert set(indices) <= set(three[name])
    assert mmlu_subset(2, seed=7) != two
    with pytest.raises(ValueError, match="per_subject"):
        mmlu_subset(0)


@pytest.mark.slow
def test_lm_eval_scores_exactly_the_subset(monkeypatch):
    from megatron_dmc.eval.lm_eval_adapter import CompressedCacheLM, run_tasks
    from tests.eval.helpers import tiny_llama, tiny_tokenizer

    seen = []
    original = CompressedCacheLM._loglikelihood_tokens

    def counting(self, pairs):
        seen.extend(pairs)
        return original(self, pairs)

    monkeypatch.setattr(CompressedCacheLM, "_loglikelihood_tokens", counting)
    out = run_tasks(tiny_llama(), tiny_tokenizer(), tasks=("mmlu",), samples=mmlu_subset(1))
    assert len(seen) == 57 * 4  # one question per subject, four choices each
    assert 0.0 <= out["mmlu"]["acc"] <= 1.0
