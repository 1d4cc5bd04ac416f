"""The flash decode backend reads the exact ring: with a merge delay its decode logits equal
the reference backend's, for DMC and DMS.

No GPU here: `flash_attn` is replaced by a torch stand-in of `flash_attn_with_kvcache` that
keeps the kernel's documented contract for a paged cache (out [R, 1, N, D]; with
return_softmax_lse the log-sum-exp [R, N, 1] of the scaled scores; a row without keys gives
out 0 and lse +inf, as flash-attn 2 does). So this checks the backend's paging arguments
and its merge of the ring, not the CUDA kernel.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from megatron_dmc.inference.decode import BACKENDS
from megatron_dmc.ops import DMCConfig, dms_config
from tests.inference.model_helpers import tiny_model
from tests.inference.test_model_parity import _cached_logits, _rel_err


def _stand_in_kernel(
    q, k_cache, v_cache, cache_seqlens, block_table, causal=False, return_softmax_lse=False
):
    rows, _, heads, dim = q.shape
    page = k_cache.shape[1]
    assert not causal and block_table.dtype == cache_seqlens.dtype == torch.int32
    out = torch.zeros_like(q)
    lse = torch.full((rows, heads, 1), math.inf)
    for r in range(rows):
        n = int(cache_seqlens[r])
        if n == 0:
            continue
        pages = block_table[r, : -(-n // page)].long()
        keys = k_cache[pages, :, 0].reshape(-1, dim)[:n].float()
        values = v_cache[pages, :, 0].reshape(-1, dim)[:n].float()
        scores = q[r, 0].float() @ keys.T / math.sqrt(dim)
        lse[r, :, 0] = torch.logsumexp(scores, -1)
        out[r, 0] = (torch.softmax(scores, -1) @ values).to(q.dtype)
    return (out, lse) if return_softmax_lse else out


@pytest.fixture
def stand_in_flash(monkeypatch):
    module = types.ModuleType("flash_attn")
    module.flash_attn_with_kvcache = _stand_in_kernel
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    sys.modules.pop("megatron_dmc.inference.flash_decode", None)
    yield
    BACKENDS.pop("flash", None)
    sys.modules.pop("megatron_dmc.inference.flash_decode", None)


CONFIGS = {
    "dmc-channel": DMCConfig(merge_delay=5),
    "dmc-heads": DMCConfig(decision_source="heads", merge_delay=5),
    "dms-heads": dms_config(6),
    "dms-query": dms_config(6, decision_source="query"),
}


@pytest.mark.usefixtures("stand_in_flash")
@pytest.mark.parametrize("prefill", [2, 11])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_flash_with_ring_equals_reference(name, prefill):
    """prefill 2 < W: the first decode steps have streams with no paged slot (ring only)."""
    model = tiny_model(CONFIGS[name], heads=4, groups=2, seed=5)
    tokens = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([30, 23])
    kwargs = dict(page_size=256)
    want, _ = _cached_logits(model, tokens, lengths, prefill, backend="reference", **kwargs)
    got, cache = _cached_logits(model, tokens, lengths, prefill, backend="flash", **kwargs)
    assert _rel_err(got[:1, prefill:], want[:1, prefill:]) <= 1e-5
    assert _rel_err(got[1:, prefill:23], want[1:, prefill:23]) <= 1e-5
    assert cache.exact is not None, "the test needs a merge delay"
    assert (cache.lengths_LBG[:, :2] < 30 - CONFIGS[name].merge_delay).any(), "needs compression"
