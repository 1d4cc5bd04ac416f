"""Data: tokenizers, text -> Megatron indexed datasets, GPTDataset microbatches."""

from megatron_dmc.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
)

__all__ = ["HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "build_tokenizer"]
