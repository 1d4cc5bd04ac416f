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

from megatron_dmc.data.gpt_dataset import (
    MicrobatchSampler,
    build_gpt_datasets,
    build_microbatch_loader,
    check_data_prefix,
)
from megatron_dmc.data.preprocess import (
    HELD_OUT_SUFFIX,
    PreprocessStats,
    preprocess_files,
    write_indexed_datasets,
)
from megatron_dmc.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
)

__all__ = [
    "HELD_OUT_SUFFIX",
    "HFTokenizer",
    "MicrobatchSampler",
    "PreprocessStats",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_gpt_datasets",
    "build_microbatch_loader",
    "build_tokenizer",
    "check_data_prefix",
    "preprocess_files",
    "write_indexed_datasets",
]
