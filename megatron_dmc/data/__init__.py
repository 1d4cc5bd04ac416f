"""Data: tokenizers, text -> Megatron indexed datasets, GPTDataset microbatches.

tok = build_tokenizer(tokenizer_dir="path/to/hf_model")      # or tokenizer_model=
preprocess_files(["corpus.jsonl"], tok, "data/corpus", held_out_fraction=0.05)
train, valid = build_gpt_datasets("data/corpus", tok, seq_length=1024,
                                  train_samples=iters * global_batch,
                                  valid_data_path="data/corpus_held_out")
for batch in build_microbatch_loader(train, micro_batch_size, consumed_samples,
                                     dp_rank, dp_size):
    batch["tokens"], batch["labels"], batch["loss_mask"], batch["position_ids"]  # [b, s]
"""

from __future__ import annotations

import importlib

from megatron_dmc.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
)

# Imported on first use: these pull in megatron.core, which tokenizer users do not need.
_LAZY = {
    "MicrobatchSampler": "gpt_dataset",
    "build_gpt_datasets": "gpt_dataset",
    "build_microbatch_loader": "gpt_dataset",
    "check_data_prefix": "gpt_dataset",
    "HELD_OUT_SUFFIX": "preprocess",
    "held_out_indices": "split",
    "PreprocessStats": "preprocess",
    "preprocess_files": "preprocess",
    "write_indexed_datasets": "preprocess",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


__all__ = ["HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "build_tokenizer", *_LAZY]
