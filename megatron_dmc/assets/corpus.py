"""The default English training text, from the `gensim` wheel's test data, tokenised once.

- `enwiki-...-shortened.bz2`: 106 English Wikipedia articles (2016 dump), markup stripped.
- `lee_background.cor`: 300 English news articles (Lee et al. 2005 corpus), one per line;
  290 remain after dropping repeated stories.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_dmc.assets.cache import build_cached, cache_root, package_dir, package_version
from megatron_dmc.assets.wikitext import wiki_documents
from megatron_dmc.data.split import held_out_indices

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
FORMAT_VERSION = 2  # bump when the text cleaning changes, so caches rebuild
MIN_CHARS = 200
DEDUP_CHARS = 120


def gensim_test_data() -> Path:
    return package_dir("gensim", "gensim") / "test" / "test_data"


def corpus_sources() -> dict[str, list[str]]:
    """Plain-text documents by source: "wikipedia" and "news", near-duplicates removed."""
    data = gensim_test_data()
    news = (data / NEWS_FILE).read_text(encoding="utf-8").splitlines()
    return {
        "wikipedia": _dedupe(wiki_documents(data / WIKI_DUMP, MIN_CHARS)),
        "news": _dedupe([line.strip() for line in news if len(line.strip()) >= MIN_CHARS]),
    }


def _dedupe(documents: list[str]) -> list[str]:
    """Drop documents that open like an earlier one (the news file repeats stories, some
    lightly edited), so the held-out split shares no story with training."""
    seen: set[str] = set()
    kept = []
    for doc in documents:
        key = " ".join(doc[:DEDUP_CHARS].lower().split())
        if key not in seen:
            seen.add(key)
            kept.append(doc)
    return kept


def default_corpus() -> list[str]:
    """Plain-text documents: the Wikipedia articles, then the news articles."""
    return [doc for docs in corpus_sources().values() for doc in docs]


def stratified_held_out(sizes: list[int], fraction: float, seed: int) -> set[int]:
    """`held_out_indices` within each source (so long articles are held out too)."""
    chosen: set[int] = set()
    offset = 0
    for size in sizes:
        chosen |= {offset + i for i in held_out_indices(size, fraction, seed)}
        offset += size
    return chosen


@dataclass(frozen=True)
class CorpusDataset:
    """Indexed-dataset prefixes (pass as --data-path / --valid-data-path) and their sizes."""

    train_prefix: str
    held_out_prefix: str
    stats: dict


def default_corpus_dataset(
    cache_dir: str | Path | None = None,
    held_out_fraction: float = 0.1,
    seed: int = 1234,
    progress: bool = True,
) -> CorpusDataset:
    """`default_corpus()` tokenised with SmolLM2's tokenizer, documents ending in EOD, with
    a seeded held-out choice of `held_out_fraction` of each source's documents; built once
    into the cache."""
    from megatron_dmc.assets.smollm2 import smollm2_hf_dir, smollm2_tokenizer
    from megatron_dmc.data.preprocess import HELD_OUT_SUFFIX, write_indexed_datasets

    tokenizer_dir = smollm2_hf_dir(cache_dir)
    key = f"gensim{package_version('gensim')}-{tokenizer_dir.name}-h{held_out_fraction}-s{seed}"
    target = cache_root(cache_dir) / f"corpus-v{FORMAT_VERSION}-{key}"

    def build(tmp: Path) -> None:
        sources = corpus_sources()
        documents = [doc for docs in sources.values() for doc in docs]
        sizes = [len(docs) for docs in sources.values()]
        held_out = stratified_held_out(sizes, held_out_fraction, seed)
        stats = write_indexed_datasets(
            documents,
            smollm2_tokenizer(cache_dir),
            tmp / "corpus",
            held_out,
            num_documents=len(documents),
            progress=progress,
        )
        summary = {
            d.prefix.rsplit("/", 1)[-1]: {"documents": d.documents, "tokens": d.tokens}
            for d in stats.datasets
        }
        summary["seconds"] = round(stats.seconds, 2)
        (tmp / "stats.json").write_text(json.dumps(summary, indent=2))

    build_cached(target, build)
    stats = json.loads((target / "stats.json").read_text())
    prefix = str(target / "corpus")
    return CorpusDataset(prefix, prefix + HELD_OUT_SUFFIX, stats)
