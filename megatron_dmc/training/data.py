"""Micro-batch iterators for training and validation over Megatron-Core GPTDatasets.

Every rank reads the same global batches (its data-parallel slice of them); pipeline
stages that do not need tokens still read them, which keeps all ranks' data position in
step and costs little.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

from megatron_dmc.data.gpt_dataset import build_gpt_datasets, build_microbatch_loader
from megatron_dmc.data.tokenizer import build_tokenizer
from megatron_dmc.training.config import TrainConfig


@dataclass
class _MockTokenizer:
    """What GPTDataset reads from a tokenizer, for random-token data."""

    vocab_size: int
    eod: int = 0

    @property
    def unique_identifiers(self) -> dict[str, int]:
        return {"vocab_size": self.vocab_size, "eod": self.eod}


def _valid_samples(cfg: TrainConfig) -> int:
    evals = cfg.train_samples // cfg.global_batch_size // (cfg.logging.eval_interval or 10**9) + 1
    return evals * cfg.logging.eval_iters * cfg.global_batch_size


def _mock_datasets(cfg: TrainConfig, vocab_size: int):
    config = GPTDatasetConfig(
        random_seed=cfg.batch.seed,
        sequence_length=cfg.batch.seq_length,
        tokenizer=_MockTokenizer(vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        split="98,2,0",
    )
    sizes = [cfg.train_samples, _valid_samples(cfg), None]
    train, valid, _ = BlendedMegatronDatasetBuilder(
        MockGPTDataset, sizes, lambda: True, config
    ).build()
    return train, valid


def build_datasets(cfg: TrainConfig, vocab_size: int):
    """(train, valid) GPTDatasets; valid may be None."""
    if cfg.data.mock_data:
        return _mock_datasets(cfg, vocab_size)
    tokenizer = build_tokenizer(cfg.data.tokenizer_model, cfg.data.tokenizer_dir)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{vocab_size} embedding rows; use the model's own tokenizer"
        )
    datasets = build_gpt_datasets(
        cfg.data.data_path,
        tokenizer,
        cfg.batch.seq_length,
        cfg.train_samples,
        valid_samples=_valid_samples(cfg) if cfg.logging.eval_interval else None,
        valid_data_path=cfg.data.valid_data_path,
        split=cfg.data.split,
        seed=cfg.batch.seed,
        cache_dir=cfg.data.data_cache_path,
        is_built_on_rank=lambda: True,
    )
    if dist.is_initialized():
        dist.barrier()
    return datasets


def micro_batches(dataset, micro_batch_size: int, consumed_samples: int) -> Iterator[dict]:
    """This rank's micro-batches from `consumed_samples` (a global count) onwards."""
    loader = build_microbatch_loader(
        dataset,
        micro_batch_size,
        consumed_samples=consumed_samples,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
    )
    return iter(loader)
