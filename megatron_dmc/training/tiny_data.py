"""Data of the tiny CPU recipe: the default English corpus with a 256-token tokenizer
trained on it, so that it fits `configs/tiny_gqa.yaml` (a 49k vocabulary such as
SmolLM2's would dominate the step time of a 64-wide model).

    python -m megatron_dmc.training.tiny_data OUT_DIR

writes OUT_DIR/tokenizer/tokenizer.json, OUT_DIR/corpus.{bin,idx} and
OUT_DIR/corpus_held_out.{bin,idx} (a no-op when they exist) and prints the flags that use
them. The tokenizer is a character-level BPE: the most frequent characters, merges up to
256 entries, `<|endoftext|>` as the document separator and `<unk>` for the rest.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from megatron_dmc.assets.corpus import corpus_sources, stratified_held_out
from megatron_dmc.data.tokenizer import DOCUMENT_SEPARATOR

VOCAB_SIZE = 256
"""configs/tiny_gqa.yaml's embedding rows."""

ALPHABET = 96
"""Characters kept as single tokens; rarer ones become <unk>."""

PREFIX = "corpus"


def train_tokenizer(documents: list[str], directory: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """A character-level BPE tokenizer.json of `vocab_size` entries, trained on `documents`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[DOCUMENT_SEPARATOR, "<unk>"],
        limit_alphabet=ALPHABET,
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def build_tiny_corpus(out_dir: str | Path, held_out_fraction: float = 0.1, seed: int = 1234):
    """Tokenizer and train / held-out indexed datasets under `out_dir` (built once)."""
    from megatron_dmc.data.preprocess import write_indexed_datasets
    from megatron_dmc.data.tokenizer import HFTokenizer

    out = Path(out_dir)
    if (out / f"{PREFIX}.idx").is_file():
        return out
    sources = corpus_sources()
    documents = [doc for docs in sources.values() for doc in docs]
    held_out = stratified_held_out([len(d) for d in sources.values()], held_out_fraction, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp", dir=out.parent))
    train_docs = [doc for i, doc in enumerate(documents) if i not in held_out]
    tokenizer = HFTokenizer(train_tokenizer(train_docs, staging / "tokenizer"))
    write_indexed_datasets(documents, tokenizer, staging / PREFIX, held_out, progress=False)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="where the tokenizer and the datasets go")
    out = build_tiny_corpus(parser.parse_args(argv).out_dir)
    print(
        f"--data-path {out / PREFIX} --valid-data-path {out / PREFIX}_held_out "
        f"--tokenizer-dir {out / 'tokenizer'}"
    )


if __name__ == "__main__":
    main()
