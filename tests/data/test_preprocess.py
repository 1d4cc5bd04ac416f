from __future__ import annotations

import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_dmc.data.preprocess import (
    held_out_indices,
    main,
    preprocess_files,
    write_indexed_datasets,
)
from megatron_dmc.data.tokenizer import HFTokenizer, SentencePieceTokenizer
from tests.data.conftest import TINY_TEXT

DOCS = [f"Document {i}: {TINY_TEXT[i % len(TINY_TEXT)]}" for i in range(20)]


def _read_all(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_indexed_dataset_holds_documents_with_eod(tmp_path, hf_tokenizer_dir):
    tok = HFTokenizer(hf_tokenizer_dir)
    stats = write_indexed_datasets(DOCS, tok, tmp_path / "d", progress=False)
    got = _read_all(str(tmp_path / "d"))
    assert got == [[*tok.encode(doc), tok.eod_id] for doc in DOCS]
    assert IndexedDataset(str(tmp_path / "d")).index.dtype == np.uint16
    assert (stats.train.documents, stats.train.tokens) == (20, sum(map(len, got)))
    assert stats.held_out is None
    assert not list(tmp_path.glob("*.tmp*"))


def test_sentencepiece_with_bos_and_no_eod(tmp_path, sp_model_file):
    tok = SentencePieceTokenizer(sp_model_file)
    kwargs = {"prepend_bos": True, "append_eod": False, "progress": False}
    write_indexed_datasets(DOCS[:3], tok, tmp_path / "d", **kwargs)
    assert _read_all(str(tmp_path / "d")) == [[1, *tok.encode(d)] for d in DOCS[:3]]


def test_held_out_split_is_disjoint_and_deterministic(tmp_path, hf_tokenizer_dir):
    tok = HFTokenizer(hf_tokenizer_dir)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    runs = []
    for name in ("a", "b"):
        preprocess_files([path], tok, tmp_path / name, held_out_fraction=0.25, progress=False)
        runs.append(
            (_read_all(str(tmp_path / name)), _read_all(str(tmp_path / f"{name}_held_out")))
        )
    assert runs[0] == runs[1]
    train, held = runs[0]
    assert (len(train), len(held)) == (15, 5)
    expected = {tuple([*tok.encode(d), tok.eod_id]) for d in DOCS}
    assert set(map(tuple, train)) | set(map(tuple, held)) == expected
    assert not set(map(tuple, train)) & set(map(tuple, held))
    assert held_out_indices(20, 0.25, seed=1234) != held_out_indices(20, 0.25, seed=1)


def test_held_out_bounds():
    assert held_out_indices(10, 0.0, 0) == set()
    assert len(held_out_indices(10, 0.01, 0)) == 1
    assert len(held_out_indices(3, 0.9, 0)) == 2
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        held_out_indices(10, 1.0, 0)
    with pytest.raises(ValueError, match="at least 2"):
        held_out_indices(1, 0.5, 0)


def test_cli_text_files_and_jsonl_key(tmp_path, hf_tokenizer_dir, capsys):
    (tmp_path / "a.txt").write_text(DOCS[0])
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": DOCS[1]}) + "\n\n")
    argv = ["--input", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "--json-key", "body"]
    argv += ["--tokenizer-dir", str(hf_tokenizer_dir), "--output-prefix", str(tmp_path / "o")]
    stats = main(argv)
    assert stats.train.documents == 2
    assert "--data-path" in capsys.readouterr().out
    tok = HFTokenizer(hf_tokenizer_dir)
    assert [tok.decode(ids[:-1]) for ids in _read_all(str(tmp_path / "o"))] == DOCS[:2]


def test_bad_inputs(tmp_path, hf_tokenizer_dir):
    tok = HFTokenizer(hf_tokenizer_dir)
    with pytest.raises(ValueError, match="not found"):
        preprocess_files([tmp_path / "nope.txt"], tok, tmp_path / "o")
    (tmp_path / "x.jsonl").write_text('{"content": "hi"}\n')
    with pytest.raises(ValueError, match="--json-keys"):
        preprocess_files([tmp_path / "x.jsonl"], tok, tmp_path / "o")
    with pytest.raises(ValueError, match="no BOS"):
        write_indexed_datasets(DOCS, _NoBos(tok), tmp_path / "o", prepend_bos=True)


class _NoBos:
    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return None if name == "bos_id" else getattr(self._tok, name)
