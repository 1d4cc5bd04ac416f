"""Text / JSONL -> Megatron-Core indexed dataset (`<prefix>.bin` + `<prefix>.idx`).

One document per JSONL line (the value of `--json-keys`) or per plain-text file; each
document becomes one sequence `[bos?] tokens [eod]`. `--split-held-out F` sends a
deterministic, seeded choice of round(F * documents) documents to `<prefix>_held_out`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from megatron_dmc.data.split import held_out_indices
from megatron_dmc.data.tokenizer import Tokenizer, build_tokenizer

HELD_OUT_SUFFIX = "_held_out"
JSON_SUFFIXES = (".jsonl", ".json")


@dataclass
class DatasetStats:
    """What one written indexed dataset holds."""

    prefix: str
    documents: int = 0
    tokens: int = 0


@dataclass
class PreprocessStats:
    train: DatasetStats
    held_out: DatasetStats | None = None
    seconds: float = 0.0

    @property
    def datasets(self) -> list[DatasetStats]:
        return [d for d in (self.train, self.held_out) if d is not None]


def read_documents(paths: Sequence[str | Path], json_key: str = "text") -> Iterator[str]:
    """Documents in input order: a JSONL line's `json_key`, or a whole text file."""
    for path in map(Path, paths):
        if path.suffix not in JSON_SUFFIXES:
            text = path.read_text(encoding="utf-8")
            if text.strip():
                yield text
            continue
        with path.open(encoding="utf-8") as lines:
            for line_no, line in enumerate(lines, 1):
                if line.strip():
                    yield _json_text(json.loads(line), json_key, path, line_no)


def _json_text(record: object, key: str, path: Path, line_no: int) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(key), str):
        raise ValueError(f"{path}:{line_no} has no string field {key!r}; set --json-keys")
    return record[key]


class _Writer:
    """An IndexedDatasetBuilder writing to temporary files, renamed into place on close."""

    def __init__(self, prefix: str, vocab_size: int) -> None:
        self.stats = DatasetStats(prefix)
        self._tmp = f"{prefix}.tmp{os.getpid()}"
        self._builder = IndexedDatasetBuilder(
            self._tmp + ".bin", dtype=DType.optimal_dtype(vocab_size)
        )

    def add(self, ids: list[int]) -> None:
        self._builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
        self.stats.documents += 1
        self.stats.tokens += len(ids)

    def close(self) -> DatasetStats:
        self._builder.finalize(self._tmp + ".idx")
        for ext in (".bin", ".idx"):
            os.replace(self._tmp + ext, self.stats.prefix + ext)
        return self.stats


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def write_indexed_datasets(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    output_prefix: str | Path,
    held_out: set[int] | frozenset[int] = frozenset(),
    append_eod: bool = True,
    prepend_bos: bool = False,
    num_documents: int | None = None,
    progress: bool = True,
    batch_size: int = 256,
) -> PreprocessStats:
    """Tokenise documents into `<prefix>` and, for indices in `held_out`, `<prefix>_held_out`."""
    if prepend_bos and tokenizer.bos_id is None:
        raise ValueError("--prepend-bos: this tokenizer has no BOS token")
    start = time.perf_counter()
    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    train = _Writer(prefix, tokenizer.vocab_size)
    other = _Writer(prefix + HELD_OUT_SUFFIX, tokenizer.vocab_size) if held_out else None
    head = [tokenizer.bos_id] if prepend_bos else []
    tail = [tokenizer.eod_id] if append_eod else []
    bar = tqdm(total=num_documents, desc="tokenising", unit="doc", disable=not progress)
    index = 0
    for batch in _batches(documents, batch_size):
        for ids in tokenizer.encode_batch(batch):
            (other if index in held_out else train).add(head + ids + tail)
            index += 1
        bar.update(len(batch))
    bar.close()
    assert other is None or max(held_out) < index, "held-out index past the last document"
    stats = PreprocessStats(train.close(), other.close() if other else None)
    stats.seconds = time.perf_counter() - start
    return stats


def preprocess_files(
    inputs: Sequence[str | Path],
    tokenizer: Tokenizer,
    output_prefix: str | Path,
    json_key: str = "text",
    held_out_fraction: float = 0.0,
    seed: int = 1234,
    **write_kwargs,
) -> PreprocessStats:
    """`write_indexed_datasets` over the documents of text / JSONL files."""
    missing = [str(p) for p in inputs if not Path(p).is_file()]
    if missing:
        raise ValueError(f"input file(s) not found: {', '.join(missing)}")
    num_documents = sum(1 for _ in read_documents(inputs, json_key))
    if num_documents == 0:
        raise ValueError(f"no non-empty documents in {', '.join(map(str, inputs))}")
    held_out = held_out_indices(num_documents, held_out_fraction, seed)
    documents = read_documents(inputs, json_key)
    return write_indexed_datasets(
        documents, tokenizer, output_prefix, held_out, num_documents=num_documents, **write_kwargs
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="text or .jsonl files")
    p.add_argument("--json-keys", "--json-key", nargs=1, default=["text"], metavar="KEY")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer-model", help="sentencepiece .model file (Llama 2)")
    p.add_argument("--tokenizer-dir", help="HF directory or tokenizer.json (SmolLM2)")
    p.add_argument("--eod-token", help="HF tokenizers: the document separator token")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--prepend-bos", action="store_true", help="start documents with BOS")
    p.add_argument("--split-held-out", type=float, default=0.0, metavar="FRACTION")
    p.add_argument("--seed", type=int, default=1234, help="seed of the held-out choice")
    return p


def main(argv: Sequence[str] | None = None) -> PreprocessStats:
    args = build_parser().parse_args(argv)
    tokenizer = build_tokenizer(args.tokenizer_model, args.tokenizer_dir, args.eod_token)
    stats = preprocess_files(
        args.input,
        tokenizer,
        args.output_prefix,
        json_key=args.json_keys[0],
        held_out_fraction=args.split_held_out,
        seed=args.seed,
        append_eod=args.append_eod,
        prepend_bos=args.prepend_bos,
    )
    for d in stats.datasets:
        print(f"{d.prefix}: {d.documents} documents, {d.tokens} tokens (--data-path {d.prefix})")
    print(f"done in {stats.seconds:.1f} s")
    return stats
