"""megatron-dmc: Dynamic Memory Compression retrofitting on Megatron-Core."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="megatron-dmc",
    version="0.1.0",
    description=(
        "Dynamic Memory Compression (Nawrot et al., ICML 2024): retrofit a Llama on "
        "Megatron-Core, convert to/from Hugging Face, and serve it with a ragged "
        "per-head compressed KV cache."
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_dmc", "megatron_dmc.*"]),
    # configs/ lives at the repository root: install editable (pip install -e .).
    package_data={"megatron_dmc": ["eval/tasks/*.yaml", "eval/tasks/*.py"]},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.17",
        "numpy>=1.26",
        "psutil>=5.9",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "transformers>=4.46",
        "tensorboard>=2.15",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "gguf>=0.10",
    ],
    extras_require={
        # Optional GPU acceleration; never imported unless present.
        "gpu": ["transformer-engine[pytorch]", "flash-attn", "triton"],
        "eval": ["lm-eval>=0.4.5"],
        "dev": ["pytest>=8", "ruff>=0.6"],
    },
)
