"""The job's inputs: the HF source model, the tokenised corpus and its held-out tokens.

`smollm2` is the embedded SmolLM2-135M; `tiny` is a random-initialised Llama of the
preset's `tiny_shape` with SmolLM2's tokenizer, so the same corpus feeds both.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from megatron_dmc.pipeline.preset import Preset

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Assets:
    hf_dir: str
    """The HF Llama the job retrofits (also the vanilla baseline)."""
    tokenizer_dir: str
    """The tokenizer that made the corpus."""
    train_prefix: str
    held_out_prefix: str

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Assets:
        return cls(**json.loads(path.read_text()))


def build_assets(preset: Preset, tiny_dir: Path, cache_dir: str | Path | None = None) -> Assets:
    """Build (or find in the cache) every input of the job."""
    from megatron_dmc.assets import default_corpus_dataset, smollm2_hf_dir

    smollm2 = smollm2_hf_dir(cache_dir)
    corpus = default_corpus_dataset(cache_dir)
    hf_dir = smollm2 if preset.model == "smollm2" else write_tiny_model(preset, smollm2, tiny_dir)
    return Assets(str(hf_dir), str(smollm2), corpus.train_prefix, corpus.held_out_prefix)


def write_tiny_model(preset: Preset, tokenizer_dir: Path, out_dir: Path) -> Path:
    """A seeded random Llama with the preset's shape, saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, **preset.tiny_shape)
    torch.manual_seed(preset.train.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out_dir / name)
    return out_dir


def write_model_yaml(hf_dir: str | Path, path: Path) -> None:
    """The Megatron model shape (`--model PATH`) of an HF Llama directory."""
    from megatron_dmc.schema.llama import llama_shape_from_hf, read_hf_config

    shape = llama_shape_from_hf(read_hf_config(hf_dir)).to_dict()
    for stored in _CHECKPOINT_ONLY_FIELDS:
        shape.pop(stored)
    path.write_text(yaml.safe_dump(shape, sort_keys=False))


_CHECKPOINT_ONLY_FIELDS = ("dtype", "dmc_decision_heads")
"""Facts about stored weights, not the model a training run builds."""
