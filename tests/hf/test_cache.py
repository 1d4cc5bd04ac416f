"""The DMC cache really stores only the kept slots: bytes follow the per-head lengths."""

import math

import pytest
import torch

from megatron_dmc.hf import DMCCache
from tests.hf.helpers import dmc_model, fire_decisions, reference_llama

IDS = torch.randint(3, 101, (2, 48), generator=torch.Generator().manual_seed(6))
FLOAT, LONG = 4, 8


def predicted_layer_bytes(lengths_U, capacity_pages, table_columns, config, page_size, batch):
    d = config.head_dim
    rows = lengths_U.numel()
    pool = capacity_pages * (page_size * 2 * d * FLOAT + LONG)  # pages and free-page stack
    table_and_lengths = rows * (table_columns + 1) * LONG
    window = rows * config.dmc_window_size * (2 * d + 1) * FLOAT + rows * LONG
    return pool + table_and_lengths + window + batch * LONG


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_prefill_allocates_exactly_the_kept_slots(page_size):
    model = fire_decisions(dmc_model(attention_bias=True), merge_bias=6.0)
    reference = reference_llama(model, "ops")
    cache = DMCCache(model.config, page_size=page_size)
    with torch.no_grad():
        model(IDS, cache=cache, use_cache=True)
        reference(IDS)
    expected_lengths = torch.stack(
        [
            IDS.shape[1] - layer.self_attn.decisions.alpha_BGT.sum(-1)
            for layer in reference.model.layers
        ]
    )
    assert torch.equal(cache.slot_counts().to(expected_lengths.dtype), expected_lengths)
    predicted = 0
    for layer in cache.layers:
        lengths_U = layer.slots.lengths_U
        pages = int(sum(math.ceil(n / page_size) for n in lengths_U.tolist()))
        columns = math.ceil(int(lengths_U.max()) / page_size)
        predicted += predicted_layer_bytes(lengths_U, pages, columns, model.config, page_size, 2)
    assert cache.allocated_bytes() == predicted
    assert cache.compression_ratio() > 1.5


@pytest.mark.parametrize("call_length", [1, 3, 28])
def test_decode_and_chunks_grow_pages_on_demand_only(call_length):
    model = fire_decisions(dmc_model())
    cache = DMCCache(model.config, page_size=4)
    with torch.no_grad():
        model(IDS[:, :20], cache=cache, use_cache=True)
        for t in range(20, IDS.shape[1], call_length):
            model(IDS[:, t : t + call_length], cache=cache, use_cache=True)
    predicted = 0
    for layer in cache.layers:
        slots, lengths_U = layer.slots, layer.slots.lengths_U
        used = sum(math.ceil(n / 4) for n in lengths_U.tolist())
        capacity = slots.pool.num_pages
        assert slots.used_pages == used
        assert used <= capacity <= 2 * used  # the shared pool doubles when it runs out
        assert slots.pages_UM.shape[1] == math.ceil(int(lengths_U.max()) / 4)
        predicted += predicted_layer_bytes(
            lengths_U, capacity, slots.pages_UM.shape[1], model.config, 4, 2
        )
    assert cache.allocated_bytes() == predicted


def test_compressed_cache_is_smaller_than_dense_on_a_long_sequence():
    model = fire_decisions(
        dmc_model(attention_bias=True, max_position_embeddings=1024), merge_bias=8.0
    )
    ids = torch.randint(3, 101, (1, 600), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    ratio = cache.compression_ratio()
    assert ratio > 2.0
    # overheads: partly filled last pages, block tables, and the window state of the open slot
    assert cache.allocated_bytes() <= 1.15 * cache.dense_bytes() / ratio
