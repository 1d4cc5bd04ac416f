"""After import-hf, Megatron's logits equal transformers' LlamaForCausalLM logits (fp32)."""

from pathlib import Path

import pytest
import torch

from megatron_dmc.convert.commands import import_hf
from megatron_dmc.distributed import destroy_distributed, initialize_distributed
from tests.convert.helpers import write_tiny_llama
from tests.convert.megatron_helpers import hf_logits, megatron_logits

FLAVOURS = {
    "gqa": {},
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=12),
    "tied_mqa_wide_heads": dict(
        tie_word_embeddings=True, num_attention_heads=3, num_key_value_heads=1, head_dim=16
    ),
    "odd_heads": dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=5, head_dim=8),
}


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_megatron_logits_match_hf(flavour: str, tmp_path: Path) -> None:
    hf = write_tiny_llama(tmp_path / "hf", seed=3, **FLAVOURS[flavour])
    meg = import_hf(hf, tmp_path / "meg")
    tokens_BT = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(0))
    ref_BTV = hf_logits(hf, tokens_BT)
    initialize_distributed(1, 1)
    try:
        got_BTV = megatron_logits(meg, tokens_BT)
    finally:
        destroy_distributed()
    assert got_BTV.shape == ref_BTV.shape
    assert relative_error(got_BTV, ref_BTV) <= 1e-5
