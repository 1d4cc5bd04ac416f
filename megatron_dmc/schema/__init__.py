"""The project's shared records, below every other package (no Megatron, no transformers).

- `schema.llama`: `LlamaShape`, the Llama architecture, read from and written to HF config.json.
- `schema.checkpoint`: the on-disk layout of Megatron checkpoints (latest file, iteration
  folders, the metadata stored in common.pt) and atomic directory writes.
"""
