"""Throughput and memory benchmarks of compressed-cache inference (`python -m megatron_dmc.bench`)."""
