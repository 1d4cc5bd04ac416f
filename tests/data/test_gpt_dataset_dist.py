"""Two gloo ranks build the same GPTDataset; rank 0 writes the index cache."""

from __future__ import annotations

import pytest

from tests.data.conftest import TINY_TEXT, build_byte_level_tokenizer_dir
from tests.dist_utils import run_distributed

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _body(root: str) -> list[list[int]]:
    import torch.distributed as dist

    from megatron_dmc.data.gpt_dataset import build_gpt_datasets
    from megatron_dmc.data.tokenizer import HFTokenizer

    dist.init_process_group("gloo")
    tok = HFTokenizer(f"{root}/tok")
    train, _ = build_gpt_datasets(f"{root}/d", tok, 8, 12, cache_dir=f"{root}/cache")
    return [train[i]["tokens"].tolist() for i in range(len(train))]


def test_two_ranks_share_the_index_cache(tmp_path):
    from megatron_dmc.data.preprocess import write_indexed_datasets
    from megatron_dmc.data.tokenizer import HFTokenizer

    tok = HFTokenizer(build_byte_level_tokenizer_dir(tmp_path / "tok"))
    write_indexed_datasets(TINY_TEXT * 4, tok, tmp_path / "d", progress=False)
    rank0, rank1 = run_distributed(_body, world_size=2, args=(str(tmp_path),))
    assert rank0 == rank1 and len(rank0) >= 12
    assert len(list((tmp_path / "cache").glob("*shuffle_index.npy"))) == 2
