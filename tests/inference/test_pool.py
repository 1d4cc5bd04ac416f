"""The page pool: a fixed pool refuses, a growable pool doubles and keeps what it holds."""

import pytest
import torch

from megatron_dmc.inference.pool import CacheFullError, PagePool


def test_fixed_pool_refuses_before_writing():
    pool = PagePool(4, 2, 3)
    pool.allocate(3)
    with pytest.raises(CacheFullError, match="1 of 4 are free"):
        pool.allocate(2)
    assert pool.num_free == 1


def test_growable_pool_grows_and_keeps_pages():
    pool = PagePool(2, 2, 3, growable=True)
    first_K = pool.allocate(2)
    pool.k_flat[:4] = torch.arange(12.0).view(4, 3)
    more_K = pool.allocate(3)
    assert pool.num_pages == 5 and pool.num_free == 0 and pool.peak_in_use == 5
    assert sorted(torch.cat([first_K, more_K]).tolist()) == list(range(5))
    torch.testing.assert_close(pool.k_flat[:4], torch.arange(12.0).view(4, 3))
    pool.release(first_K)
    assert sorted(pool.allocate(2).tolist()) == sorted(first_K.tolist())


def test_fresh_pool_hands_out_ascending_ids_so_streams_lie_in_address_order():
    pool = PagePool(6, 2, 3, growable=True)
    assert pool.allocate(3).tolist() == [0, 1, 2]
    assert pool.allocate(2).tolist() == [3, 4]
    assert pool.allocate(3).tolist() == [5, 6, 7]
    pool.release(torch.tensor([1, 2]))
    assert pool.allocate(2).tolist() == [2, 1]
