from __future__ import annotations

import pytest
import torch

from megatron_dmc.data.gpt_dataset import (
    MicrobatchSampler,
    build_gpt_datasets,
    build_microbatch_loader,
    check_data_prefix,
)
from megatron_dmc.data.preprocess import write_indexed_datasets
from megatron_dmc.data.tokenizer import HFTokenizer
from tests.data.conftest import TINY_TEXT

DOCS = [f"Document {i}: {TINY_TEXT[i % len(TINY_TEXT)]}" for i in range(40)]
SEQ = 16


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, hf_tokenizer_dir):
    root = tmp_path_factory.mktemp("gpt")
    tok = HFTokenizer(hf_tokenizer_dir)
    held = set(range(0, 40, 8))
    write_indexed_datasets(DOCS, tok, root / "d", held_out=held, progress=False)
    return tok, str(root / "d"), root


def _stream(tok, docs) -> list[int]:
    return [t for d in docs for t in [*tok.encode(d), tok.eod_id]]


def test_samples_are_windows_of_the_documents_in_dataset_order(prepared):
    tok, prefix, root = prepared
    train, valid = build_gpt_datasets(
        prefix,
        tok,
        SEQ,
        train_samples=20,
        valid_data_path=prefix + "_held_out",
        cache_dir=root / "cache",
    )
    train_docs = [d for i, d in enumerate(DOCS) if i % 8]
    stream = _stream(tok, [train_docs[i] for i in train.document_index[: len(train_docs)]])
    inverse = torch.argsort(torch.as_tensor(train.shuffle_index))
    first = train[int(inverse[0])]
    assert first["tokens"].tolist() == stream[:SEQ]
    assert first["labels"].tolist() == stream[1 : SEQ + 1]
    second = train[int(inverse[1])]
    assert second["tokens"].tolist() == stream[SEQ : 2 * SEQ]
    assert len(train) >= 20
    assert set(first) == {"tokens", "labels", "loss_mask", "position_ids"}
    held_docs = DOCS[::8]
    held_stream = _stream(tok, [held_docs[i] for i in valid.document_index])
    valid_first = valid[int(torch.argsort(torch.as_tensor(valid.shuffle_index))[0])]
    assert valid_first["tokens"].tolist() == held_stream[:SEQ]


def test_split_weights_without_valid_prefix(prepared):
    tok, prefix, root = prepared
    train, valid = build_gpt_datasets(prefix, tok, SEQ, 10, split="80,20,0", cache_dir=root / "c2")
    assert len(train) >= 10 and valid is not None and len(valid) > 0


def test_microbatch_loader_shapes_dp_slices_and_resume(prepared):
    tok, prefix, root = prepared
    train, _ = build_gpt_datasets(prefix, tok, SEQ, 24, cache_dir=root / "cache")
    batches = list(build_microbatch_loader(train, micro_batch_size=2))
    b = batches[0]
    assert b["tokens"].shape == b["labels"].shape == b["loss_mask"].shape == (2, SEQ)
    assert b["tokens"].dtype == b["position_ids"].dtype == torch.int64
    assert b["loss_mask"].dtype == torch.float32
    assert torch.equal(b["position_ids"][1], torch.arange(SEQ))
    ranks = [list(build_microbatch_loader(train, 1, 0, r, 2)) for r in range(2)]
    for step, (r0, r1) in enumerate(zip(*ranks)):
        together = torch.cat([r0["tokens"], r1["tokens"]])
        assert torch.equal(together, batches[step]["tokens"])
    resumed = list(build_microbatch_loader(train, 2, consumed_samples=4))
    assert torch.equal(resumed[0]["tokens"], batches[2]["tokens"])
    assert len(MicrobatchSampler(10, 2, 0, 1, 2)) == 2


def test_bad_prefix_fails_before_any_work(tmp_path, hf_tokenizer_dir):
    tok = HFTokenizer(hf_tokenizer_dir)
    with pytest.raises(ValueError, match=r"preprocess_data\.py"):
        build_gpt_datasets(tmp_path / "nothing", tok, SEQ, 10, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    (tmp_path / "half.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"half\.idx not found"):
        check_data_prefix(tmp_path / "half")
    with pytest.raises(ValueError, match=r"without \.bin"):
        check_data_prefix(tmp_path / "half.bin")
    with pytest.raises(ValueError, match="data-parallel rank"):
        MicrobatchSampler(10, 1, 0, 2, 2)
