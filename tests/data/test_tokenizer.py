from __future__ import annotations

import pytest

from megatron_dmc.data.tokenizer import HFTokenizer, SentencePieceTokenizer, build_tokenizer
from tests.data.conftest import TINY_TEXT


def test_hf_round_trip_and_special_ids(hf_tokenizer_dir):
    tok = build_tokenizer(tokenizer_dir=hf_tokenizer_dir)
    assert isinstance(tok, HFTokenizer)
    for text in TINY_TEXT:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.eod_id == 0  # <|endoftext|> wins over the chat eos
    assert tok.bos_id == 1
    assert tok.encode_batch(TINY_TEXT[:2]) == [tok.encode(t) for t in TINY_TEXT[:2]]


def test_hf_tokenizer_json_file_and_explicit_eod(hf_tokenizer_dir):
    tok = HFTokenizer(hf_tokenizer_dir / "tokenizer.json", eod_token="<|im_end|>")
    assert tok.eod_id == 2
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        HFTokenizer(hf_tokenizer_dir, eod_token="<nope>")


def test_sentencepiece_round_trip(sp_model_file):
    tok = build_tokenizer(tokenizer_model=sp_model_file)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eod_id, tok.vocab_size) == (1, 2, 400)
    for text in TINY_TEXT:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eod_id not in ids
        assert tok.decode(ids) == text
    assert tok.encode_batch(TINY_TEXT[:2]) == [tok.encode(t) for t in TINY_TEXT[:2]]


def test_missing_files_and_bad_choice(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer(tokenizer_model=tmp_path / "missing.model")
    with pytest.raises(ValueError, match=r"no tokenizer\.json"):
        build_tokenizer(tokenizer_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        build_tokenizer()
    with pytest.raises(ValueError, match="exactly one"):
        build_tokenizer(tokenizer_model="a", tokenizer_dir="b")
