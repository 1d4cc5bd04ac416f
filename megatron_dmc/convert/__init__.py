"""Checkpoint converters: HF Llama <-> Megatron-Core (any TP/PP), DMC-aware HF export,
import of the released NVIDIA DMC checkpoints. See docs/convert.md."""
