"""The multi-process harness itself; bodies import only torch so the ranks start fast."""

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_distributed


def _sum_ranks() -> float:
    dist.init_process_group("gloo")
    x = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(x)
    assert dist.get_rank() == 0 or x.item() == 0.0, "rank one disagrees"
    return x.item()


@pytest.mark.slow
def test_results_by_rank_and_failures_reach_the_test():
    with pytest.raises(AssertionError, match=r"(?s)rank 1 failed.*rank one disagrees"):
        run_distributed(_sum_ranks, world_size=2, timeout_s=120)
