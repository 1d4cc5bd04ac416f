"""One DMC export, two engines: the transformers model (megatron_dmc.hf) and the paged
engine (megatron_dmc.inference) give the same logits and keep the same slots per head."""

from __future__ import annotations

import pytest
import torch

from megatron_dmc.eval.caches import forward_cached
from megatron_dmc.eval.methods import load_model as load_hf
from megatron_dmc.hf import DMCLlamaForCausalLM, LlamaDMCConfig
from megatron_dmc.inference.kv_cache import PagedKVCache
from megatron_dmc.inference.loading import load_model as load_engine

VOCAB, GROUPS, DIM = 211, 2, 16


MODES = {
    "channel": dict(),
    "heads": dict(dmc_decision_source="heads"),
    "channel+delay": dict(dmc_merge_delay=5),
    "heads+delay": dict(dmc_decision_source="heads", dmc_merge_delay=5),
    "heads+delay+threshold": dict(
        dmc_decision_source="heads", dmc_merge_delay=5, dmc_decision_threshold=-2.0
    ),
}


@pytest.fixture(scope="module", params=sorted(MODES))
def export_dir(tmp_path_factory, request):
    """A tiny DMC Llama saved as an HF directory whose decisions (channel D-1 or decision
    heads) merge a good share of the tokens."""
    torch.manual_seed(0)
    config = LlamaDMCConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=GROUPS,
        head_dim=DIM,
        max_position_embeddings=256,
        dmc_window_size=4,
        **MODES[request.param],
    )
    model = DMCLlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if config.dmc_decision_source == "heads":
                weight = layer.self_attn.dmc_decision_proj.weight
                weight.normal_(0.0, 0.06 / weight.shape[1] ** 0.5)
                continue
            rows_GDC = layer.self_attn.k_proj.weight.view(GROUPS, DIM, -1)
            rows_GDC[:, -1] *= 60.0 / rows_GDC[:, -1].norm(dim=-1, keepdim=True)
    path = tmp_path_factory.mktemp("export")
    model.save_pretrained(path)
    return path


def _ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def test_full_forward_logits_match(export_dir):
    hf, engine = load_hf(export_dir), load_engine(export_dir)
    assert engine.dmc is not None and engine.dmc.window_size == 4
    assert engine.dmc.decision_source == hf.config.dmc_decision_source
    assert engine.dmc.merge_delay == hf.config.dmc_merge_delay
    assert engine.dmc.decision_threshold == hf.config.dmc_decision_threshold
    ids_BT = _ids(40)
    with torch.no_grad():
        expected_BTV = hf(ids_BT, use_cache=False).logits
    torch.testing.assert_close(engine(ids_BT), expected_BTV, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefill_chunks", [(30,), (11, 19)])
def test_cached_logits_and_slot_counts_match(export_dir, prefill_chunks):
    hf, engine = load_hf(export_dir), load_engine(export_dir)
    ids_BT = _ids(37, seed=2)
    cache = PagedKVCache(engine.cache_config(64, 1, 64, page_size=4))
    seq_ids_B = cache.add_sequences(1)
    hf_cache, start = None, 0
    for length in (*prefill_chunks, 1, 1, 4, 1):
        piece_BT = ids_BT[:, start : start + length]
        start += length
        hf_logprobs_BTV, hf_cache = forward_cached(hf, piece_BT, hf_cache)
        logits_BTV = engine.extend(piece_BT, cache, seq_ids_B)
        torch.testing.assert_close(
            torch.log_softmax(logits_BTV, -1), hf_logprobs_BTV, rtol=1e-5, atol=1e-5
        )
        counts_LBG = cache.slot_counts(seq_ids_B)
        assert torch.equal(counts_LBG, hf_cache.slot_counts())
    layers = counts_LBG.shape[0]
    assert int(counts_LBG.sum()) < 0.85 * layers * GROUPS * start  # decisions really merged
