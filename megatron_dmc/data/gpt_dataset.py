"""Train / valid `GPTDataset`s over indexed `.bin/.idx` data, and microbatch loaders.

Legend: b micro-batch size, s sequence length.

Built with Megatron-Core's `BlendedMegatronDatasetBuilder`; no torch.distributed needed in
one process. Under torch.distributed every rank must call `build_gpt_datasets`: global
rank 0 writes the shuffle/sample index cache (`cache_dir`, default Megatron's
`<prefix>/cache/GPTDataset_indices`), all ranks pass a barrier, the other ranks then read
that cache, so `cache_dir` must be on a filesystem every rank sees.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from torch.utils.data import DataLoader, Sampler

from megatron_dmc.data.tokenizer import Tokenizer


def check_data_prefix(prefix: str | Path, flag: str = "--data-path") -> str:
    """The prefix as a string, or ValueError if `<prefix>.bin` / `<prefix>.idx` is missing."""
    prefix = str(prefix)
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            raise ValueError(f"{flag} takes the prefix without {ext}: use {prefix[: -len(ext)]}")
    missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if missing:
        raise ValueError(
            f"{flag} {prefix}: {' and '.join(missing)} not found; create the dataset with "
            f"tools/preprocess_data.py --output-prefix {prefix}"
        )
    return prefix


def indexed_tokens(prefix: str | Path, flag: str = "--data-path") -> torch.Tensor:
    """Every document's tokens of an indexed dataset, concatenated (each ends in its EOD)."""
    dataset = IndexedDataset(check_data_prefix(prefix, flag))
    tokens = np.concatenate([dataset[i] for i in range(len(dataset))])
    return torch.from_numpy(tokens.astype(np.int64))


class _TokenizerInfo:
    """The part of a Megatron tokenizer that GPTDataset reads (eod, vocab size, cache key)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod_id
        self.unique_identifiers = {
            "class": type(tokenizer).__name__,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
        }


def build_gpt_datasets(
    data_path: str | Path,
    tokenizer: Tokenizer,
    seq_length: int,
    train_samples: int,
    valid_samples: int | None = None,
    valid_data_path: str | Path | None = None,
    split: str = "99,1,0",
    seed: int = 1234,
    cache_dir: str | Path | None = None,
    is_built_on_rank: Callable[[], bool] = lambda: True,
) -> tuple[GPTDataset, GPTDataset | None]:
    """Train and valid GPTDatasets with at least `train_samples` / `valid_samples` sequences.

    Without `valid_data_path` the documents of `data_path` are divided by `split`
    (Megatron's "train,valid,test" weights); with it, `data_path` is all training data and
    `valid_data_path` (e.g. the `_held_out` dataset of the preprocessor) all validation.
    `valid_samples=None` means one pass over the validation documents.
    """
    if seq_length < 1 or train_samples < 1:
        raise ValueError(
            f"need seq_length >= 1 and train_samples >= 1, got {seq_length}, {train_samples}"
        )
    train_prefix = check_data_prefix(data_path)
    blend_kwargs: dict = {"blend": ([train_prefix], None), "split": split}
    if valid_data_path is not None:
        valid_prefix = check_data_prefix(valid_data_path, "--valid-data-path")
        blend_kwargs = {"blend_per_split": [([train_prefix], None), ([valid_prefix], None), None]}
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=_TokenizerInfo(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=None if cache_dir is None else str(cache_dir),
        **blend_kwargs,
    )
    sizes = [train_samples, valid_samples, None]
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, is_built_on_rank, config
    ).build()
    assert train is not None, "no training dataset was built on this rank"
    return train, valid


class MicrobatchSampler(Sampler[list[int]]):
    """Consecutive sample indices, one micro-batch per data-parallel rank per step.

    Global step k covers samples [k*b*dp, (k+1)*b*dp); rank r takes its b-slice of it.
    `consumed_samples` (summed over data-parallel ranks) resumes mid-run.
    """

    def __init__(
        self,
        total_samples: int,
        micro_batch_size: int,
        consumed_samples: int = 0,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
    ) -> None:
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data-parallel rank {data_parallel_rank} not in [0, {data_parallel_size})"
            )
        if micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be >= 1, got {micro_batch_size}")
        self.total = total_samples
        self.consumed = consumed_samples
        self.b = micro_batch_size
        self.rank = data_parallel_rank
        self.step = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // self.step)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(self.consumed, self.total - self.step + 1, self.step):
            first = start + self.rank * self.b
            yield list(range(first, first + self.b))


def build_microbatch_loader(
    dataset: GPTDataset,
    micro_batch_size: int,
    consumed_samples: int = 0,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    num_workers: int = 0,
) -> DataLoader:
    """Micro-batches dict(tokens [b, s] int64, labels [b, s] int64, loss_mask [b, s] float32,
    position_ids [b, s] int64) from `dataset`, for this data-parallel rank."""
    sampler = MicrobatchSampler(
        len(dataset), micro_batch_size, consumed_samples, data_parallel_rank, data_parallel_size
    )
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers)
