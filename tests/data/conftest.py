"""Tiny tokenizers built in the test session (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be, or not to be, that is the question.",
    "All that glitters is not gold; all who wander are not lost.",
    "Ünïcödé text and numbers 12345 survive the round trip.",
]


def build_byte_level_tokenizer_dir(directory: Path) -> Path:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json), SmolLM2 style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_TEXT * 4, trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = '{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}'
    (directory / "tokenizer_config.json").write_text(config)
    return directory


def build_sentencepiece_model(directory: Path) -> Path:
    """A tiny BPE sentencepiece model with Llama 2's special ids (unk 0, bos 1, eos 2)."""
    import sentencepiece

    directory.mkdir(parents=True, exist_ok=True)
    text_file = directory / "train.txt"
    text_file.write_text("\n".join(TINY_TEXT * 4), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(directory / "tiny"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    return directory / "tiny.model"


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_byte_level_tokenizer_dir(tmp_path_factory.mktemp("hf_tok"))


@pytest.fixture(scope="session")
def sp_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sentencepiece_model(tmp_path_factory.mktemp("sp_tok"))
