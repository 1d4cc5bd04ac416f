"""Tiny random models and a byte-level tokenizer built in memory (no downloads)."""

from __future__ import annotations

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TEXT = [
    "The quick brown fox jumps over the lazy dog. Question: Answer: yes no",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
]


def tiny_llama(kv_heads: int = 2, vocab: int = 300, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer(vocab: int = 300) -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXT, vocab_size=vocab, special_tokens=["<eos>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")
