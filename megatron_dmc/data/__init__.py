"""Data: tokenizers (`data.tokenizer`, no Megatron), text -> Megatron indexed datasets
(`data.preprocess`), GPTDataset microbatches (`data.gpt_dataset`).

tok = build_tokenizer(tokenizer_dir="path/to/hf_model")      # or tokenizer_model=
preprocess_files(["corpus.jsonl"], tok, "data/corpus", held_out_fraction=0.05)
train, valid = build_gpt_datasets("data/corpus", tok, seq_length=1024,
                                  train_samples=iters * global_batch,
                                  valid_data_path="data/corpus_held_out")
for batch in build_microbatch_loader(train, micro_batch_size, consumed_samples,
                                     dp_rank, dp_size):
    batch["tokens"], batch["labels"], batch["loss_mask"], batch["position_ids"]  # [b, s]
"""
