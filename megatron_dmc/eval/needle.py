"""Long-context retrieval generated locally, in the style of RULER (Hsieh et al. 2024).

Three tasks, each a haystack of real English text (the embedded corpus, whole sentences)
with facts inserted at a chosen depth, then a question answered by greedy decoding:

- `passkey`: one needle, "The pass key is 4829301. Remember it. ..."; answer the number.
- `multikey`: "One of the special magic numbers for {word} is: {number}." for the queried
  word at the depth and `distractors` other words at seeded random depths; answer the
  queried word's number.
- `vartrack`: a chain "VAR ABCDE = 12345." "VAR FGHIJ = VAR ABCDE." ... of `hops` links,
  the first at the depth and the rest spread evenly from there to the end; answer every
  variable that holds the number (scored as the fraction named, RULER's string_match_all;
  decoding stops at a blank line, not the first newline, so a list over lines counts).

A sample of length L has at most L - max_new_tokens prompt tokens, so prompt and answer fit
in L. Every method gets the same prompts (seeded by task, length, depth and index, never
by method) and the same KV budget: an eviction method keeps prompt tokens / CR slots per
layer and KV head; the prompt goes through the cache `prefill_chunk` tokens per call.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
from dataclasses import asdict, dataclass
from types import SimpleNamespace

from torch import nn
from tqdm import tqdm

from megatron_dmc.eval.caches import KVMethod

NEEDLE_TASKS = ("passkey", "multikey", "vartrack")
INTRO = (
    "Some important facts are hidden inside a long text. Find them and memorize them; "
    "you will be asked about them.\n\n"
)
WORDS = (
    "apple", "river", "candle", "garden", "hammer", "island", "jacket", "ladder", "marble",
    "needle", "orange", "pencil", "rabbit", "saddle", "tiger", "violin", "window", "yellow",
    "anchor", "bottle", "castle", "dragon", "engine", "forest", "guitar", "harbor", "meadow",
    "planet", "rocket", "silver", "tunnel", "wallet",
)  # fmt: skip


@dataclass
class NeedleSettings:
    """The grid of samples and how they are decoded."""

    tasks: tuple[str, ...] = NEEDLE_TASKS
    """Any of passkey, multikey, vartrack."""
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    """Context lengths in tokens (prompt + answer), each at most the model's limit."""
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Where the needle sits in the haystack: 0 its start, 1 its end."""
    samples: int = 1
    """Samples per (task, length, depth), each with other filler, keys and values."""
    seed: int = 1234
    """Seed of filler offsets, keys and values."""
    distractors: int = 3
    """multikey: needles of other keys besides the queried one."""
    hops: int = 4
    """vartrack: assignments after the first (hops + 1 variables hold the value)."""
    prefill_chunk: int | None = 512
    """Prompt tokens per forward call (bounds eager attention's memory at long contexts)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(NEEDLE_TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"needle tasks must be among {NEEDLE_TASKS}; got {self.tasks}")
        if not self.lengths or min(self.lengths) < 256:
            raise ValueError(f"needle lengths must be >= 256 tokens; got {self.lengths}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"needle depths must lie in [0, 1]; got {self.depths}")
        if self.samples < 1 or self.distractors < 0 or self.hops < 1:
            raise ValueError("needle samples >= 1, distractors >= 0 and hops >= 1 are needed")


@dataclass
class NeedleSample:
    """One prompt and what its answer must contain."""

    task: str
    length: int
    depth: float
    index: int
    prompt: str
    answers: list[str]
    max_new_tokens: int
    stop: list[str]
    """Decoding stops at the first of these."""
    prompt_tokens: int = 0


@dataclass
class _Facts:
    needles: list[tuple[float, str]]
    """(depth, sentence) to insert."""
    question: str
    answers: list[str]
    max_new_tokens: int
    stop: tuple[str, ...] = ("\n",)


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _passkey(rng: random.Random, depth: float, s: NeedleSettings) -> _Facts:
    key = _number(rng)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return _Facts([(depth, needle)], "What is the pass key? The pass key is", [key], 12)


def _multikey(rng: random.Random, depth: float, s: NeedleSettings) -> _Facts:
    words = rng.sample(WORDS, s.distractors + 1)
    values = [_number(rng) for _ in words]
    depths = [depth] + [rng.random() for _ in range(s.distractors)]
    needles = [
        (d, f"One of the special magic numbers for {w} is: {v}.")
        for d, w, v in zip(depths, words, values)
    ]
    question = (
        f"What is the special magic number for {words[0]}? "
        f"The special magic number for {words[0]} is:"
    )
    return _Facts(needles, question, [values[0]], 12)


def _vartrack(rng: random.Random, depth: float, s: NeedleSettings) -> _Facts:
    names = ["".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5)) for _ in range(s.hops + 1)]
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."]
    chain += [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
    depths = [depth + (1.0 - depth) * i / len(chain) for i in range(len(chain))]
    question = (
        f"Which variables are assigned the value {value}, directly or through other "
        f"variables? Answer: {len(names)} variables are assigned the value {value}; they are:"
    )
    return _Facts(list(zip(depths, chain)), question, names, 8 * len(names), ("\n\n",))


_BUILDERS = {"passkey": _passkey, "multikey": _multikey, "vartrack": _vartrack}


@functools.lru_cache(maxsize=2)
def corpus_sentences() -> tuple[str, ...]:
    """Sentences of the embedded corpus (Wikipedia and news), in order."""
    from megatron_dmc.assets import default_corpus

    return split_sentences(" ".join(default_corpus()))


def split_sentences(text: str) -> tuple[str, ...]:
    pieces = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return tuple(p for p in pieces if len(p) > 1)


def _haystack(sentences, lengths, budget: int, start: int) -> tuple[list[str], list[int]]:
    """Consecutive sentences from `start` (wrapping) until `budget` tokens."""
    picked, sizes, used, i = [], [], 0, start
    while used < budget:
        size = lengths(i % len(sentences))
        if used + size > budget:
            break
        picked.append(sentences[i % len(sentences)])
        sizes.append(size)
        used, i = used + size, i + 1
    return picked, sizes


def _insert(picked: list[str], sizes: list[int], needles: list[tuple[float, str]]) -> str:
    """The haystack with each needle before the first sentence past its depth in tokens."""
    total, cumulative = sum(sizes), [0]
    for size in sizes:
        cumulative.append(cumulative[-1] + size)
    slots: dict[int, list[str]] = {}
    for depth, needle in sorted(needles, key=lambda n: n[0]):
        where = next(i for i, c in enumerate(cumulative) if c >= depth * total)
        slots.setdefault(where, []).append(needle)
    out = []
    for i in range(len(picked) + 1):
        out += slots.get(i, [])
        if i < len(picked):
            out.append(picked[i])
    return " ".join(out)


def make_sample(
    tokenizer, task: str, length: int, depth: float, index: int, s: NeedleSettings,
    sentences: tuple[str, ...],
) -> NeedleSample:  # fmt: skip
    """The seeded sample of `task` at `length` tokens with its needle at `depth`."""
    rng = random.Random(f"{s.seed}-{task}-{length}-{depth}-{index}")
    facts = _BUILDERS[task](rng, depth, s)
    count = functools.lru_cache(maxsize=None)(
        lambda i: len(tokenizer.encode(" " + sentences[i], add_special_tokens=False))
    )
    start = rng.randrange(len(sentences))
    fixed = INTRO + " ".join(n for _, n in facts.needles) + "\n\n" + facts.question
    budget = length - facts.max_new_tokens - len(tokenizer.encode(fixed))
    while True:
        picked, sizes = _haystack(sentences, count, budget, start)
        prompt = f"{INTRO}{_insert(picked, sizes, facts.needles)}\n\n{facts.question}"
        tokens = len(tokenizer.encode(prompt, add_special_tokens=False))
        if tokens + facts.max_new_tokens <= length or not picked:
            break
        budget -= tokens + facts.max_new_tokens - length
    sample = NeedleSample(
        task, length, depth, index, prompt, facts.answers, facts.max_new_tokens, list(facts.stop)
    )
    sample.prompt_tokens = tokens
    return sample


def make_samples(
    tokenizer, settings: NeedleSettings, sentences: tuple[str, ...] | None = None
) -> list[NeedleSample]:
    """The whole grid, identical for every method (task, length, depth, index order)."""
    sentences = sentences or corpus_sentences()
    return [
        make_sample(tokenizer, task, length, depth, i, settings, sentences)
        for task in settings.tasks
        for length in settings.lengths
        for depth in settings.depths
        for i in range(settings.samples)
    ]


def score(output: str, answers: list[str]) -> float:
    """Fraction of the expected strings in the output (1 or 0 with one answer)."""
    return sum(a in output for a in answers) / len(answers)


def _grid(cells: list[dict]) -> dict:
    """{task: {length: {depth: mean score}}} with string keys (JSON)."""
    sums: dict = {}
    for c in cells:
        slot = sums.setdefault(c["task"], {}).setdefault(str(c["length"]), {})
        slot.setdefault(str(c["depth"]), []).append(c["score"])
    return {
        task: {n: {d: sum(v) / len(v) for d, v in ds.items()} for n, ds in by_len.items()}
        for task, by_len in sums.items()
    }


def run_needle(
    model: nn.Module,
    tokenizer,
    method: KVMethod,
    settings: NeedleSettings | None = None,
    samples: list[NeedleSample] | None = None,
    progress: bool = True,
) -> dict:
    """Accuracy of `method` per task, length and depth, and every sample's output (JSON)."""
    from megatron_dmc.eval.lm_eval_adapter import CompressedCacheLM

    s = settings or NeedleSettings()
    limit = model.config.max_position_embeddings
    if max(s.lengths) > limit:
        raise ValueError(f"needle lengths {s.lengths} exceed the model's limit of {limit}")
    samples = samples if samples is not None else make_samples(tokenizer, s)
    lm = CompressedCacheLM(model, tokenizer, method, s.prefill_chunk, progress=False)
    cells = []
    for sample in tqdm(samples, desc=f"needle {method.name}", disable=not progress):
        request = (sample.prompt, {"until": sample.stop, "max_gen_toks": sample.max_new_tokens})
        output = lm.generate_until([SimpleNamespace(args=request)])[0]
        cell = asdict(sample) | {"output": output, "score": score(output, sample.answers)}
        cell.pop("prompt")
        cells.append(cell)
    by_task = {t: [c["score"] for c in cells if c["task"] == t] for t in s.tasks}
    return {
        "acc": sum(c["score"] for c in cells) / len(cells),
        "acc_by_task": {t: sum(v) / len(v) for t, v in by_task.items() if v},
        "grid": _grid(cells),
        "settings": asdict(s),
        "samples": cells,
    }
