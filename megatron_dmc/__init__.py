"""megatron-dmc: Dynamic Memory Compression (Nawrot et al., ICML 2024) on Megatron-Core.

Subpackages:
    ops        pure-tensor DMC maths (no Megatron import)
    model      the Megatron-Core seam (DMCSelfAttention, layer specs, configs)
    training   retrofit stages, CR schedule, the train loop, checkpoints
    convert    HF Llama <-> Megatron-Core converters, import of released DMC checkpoints
    inference  ragged per-head paged KV cache, parallel prefill, decode
    hf         transformers-side DMC Llama and its compressed Cache
    eval       perplexity, lm-eval adapter, baselines
    bench      throughput and memory benchmarks
"""

__version__ = "0.1.0"
