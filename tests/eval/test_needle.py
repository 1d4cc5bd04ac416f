"""Retrieval samples: the right length, the needle at its depth, the same prompts for
every method; scores and the accuracy grid."""

from __future__ import annotations

import pytest

from megatron_dmc.eval.methods import build_method
from megatron_dmc.eval.needle import (
    INTRO,
    NeedleSettings,
    make_sample,
    make_samples,
    run_needle,
    score,
    split_sentences,
)
from tests.eval.helpers import tiny_llama, tiny_tokenizer

TOPICS = ("weather", "river", "market", "train", "garden", "library", "mountain", "harbour")
SENTENCES = split_sentences(
    " ".join(
        f"Sentence {i} is about the {TOPICS[i % len(TOPICS)]} and what people said there."
        for i in range(400)
    )
)


@pytest.mark.parametrize("task", ["passkey", "multikey", "vartrack"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_sample_fits_and_places_the_needle(task, depth):
    tokenizer = tiny_tokenizer()
    settings = NeedleSettings(tasks=(task,), lengths=(2048,), depths=(depth,))
    sample = make_sample(tokenizer, task, 2048, depth, 0, settings, SENTENCES)
    tokens = len(tokenizer.encode(sample.prompt, add_special_tokens=False))
    assert tokens == sample.prompt_tokens
    assert 2048 - sample.max_new_tokens - 64 <= tokens <= 2048 - sample.max_new_tokens
    haystack = sample.prompt[len(INTRO) :].rsplit("\n\n", 1)[0]
    first = haystack.index(sample.answers[0])
    assert abs(first / len(haystack) - depth) < 0.15
    assert all(a in haystack for a in sample.answers)


def test_multikey_has_distractors_and_vartrack_a_chain():
    tokenizer, settings = tiny_tokenizer(), NeedleSettings(distractors=3, hops=4)
    multi = make_sample(tokenizer, "multikey", 512, 0.5, 0, settings, SENTENCES)
    assert multi.prompt.count("One of the special magic numbers for") == 3 + 1
    chain = make_sample(tokenizer, "vartrack", 512, 0.25, 0, settings, SENTENCES)
    assert len(chain.answers) == 5 and chain.prompt.count("VAR ") == 5 + 4


def test_samples_are_seeded_and_vary_with_index():
    tokenizer = tiny_tokenizer()
    settings = NeedleSettings(tasks=("passkey",), lengths=(300,), depths=(0.5,), samples=2)
    first, again = (
        make_samples(tokenizer, settings, SENTENCES),
        make_samples(tokenizer, settings, SENTENCES),
    )
    assert first == again
    assert first[0].prompt != first[1].prompt and first[0].answers != first[1].answers


def test_score_is_the_fraction_of_answers_found():
    assert score(" 1234567.", ["1234567"]) == 1.0
    assert score(" 1234568.", ["1234567"]) == 0.0
    assert score("AB, CD and", ["AB", "CD", "EF", "GH"]) == 0.5


def test_bad_settings_are_refused():
    for bad in (dict(tasks=("haystack",)), dict(lengths=(100,)), dict(depths=(1.5,))):
        with pytest.raises(ValueError):
            NeedleSettings(**bad)


@pytest.mark.parametrize("method,cr", [("vanilla", 1.0), ("h2o", 2.0), ("tova", 2.0)])
def test_run_needle_grid(method, cr):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    settings = NeedleSettings(lengths=(256, 400), depths=(0.0, 1.0), prefill_chunk=128)
    samples = make_samples(tokenizer, settings, SENTENCES)
    out = run_needle(model, tokenizer, build_method(method, cr), settings, samples, False)
    assert len(out["samples"]) == 3 * 2 * 2
    assert set(out["grid"]) == {"passkey", "multikey", "vartrack"}
    assert set(out["grid"]["passkey"]) == {"256", "400"}
    assert set(out["grid"]["passkey"]["256"]) == {"0.0", "1.0"}
    mean = sum(c["score"] for c in out["samples"]) / len(out["samples"])
    assert out["acc"] == pytest.approx(mean)
    with pytest.raises(ValueError, match="limit"):
        run_needle(model, tokenizer, build_method(method, cr), NeedleSettings(lengths=(1024,)))


def test_run_needle_through_the_dmc_cache():
    from tests.eval.test_dmc_path import _tiny_dmc

    settings = NeedleSettings(tasks=("passkey",), lengths=(300,), depths=(0.5,), prefill_chunk=64)
    samples = make_samples(tiny_tokenizer(), settings, SENTENCES)
    out = run_needle(_tiny_dmc(), tiny_tokenizer(), build_method("dmc"), settings, samples, False)
    assert len(out["samples"]) == 1 and 0.0 <= out["acc"] <= 1.0
