"""Checkpoint converters: HF Llama <-> Megatron-Core (any TP/PP), DMC-aware HF export,
import of the released NVIDIA DMC checkpoints. See docs/convert.md.

`mapping` is the table of tensors and their two directions; `commands` the entry points
(import_hf, export_hf, reshard, roundtrip, import_release, export_release_hf).
"""
