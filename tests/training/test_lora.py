"""LoRA adapters in one process: a fresh adapter is the original model, merging keeps the
logits, disabling gives the base, and the trainable sets name the right parameters.

Legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dmc.distributed import destroy_distributed, initialize_distributed, seed_everything
from megatron_dmc.model import build_model
from megatron_dmc.model.lora import adapted_linears, adapters_disabled, add_adapters, merge_adapters
from megatron_dmc.schema.llama import LlamaShape
from megatron_dmc.training.config import RetrofitArgs
from megatron_dmc.training.trainable import apply_trainable, is_trainable


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    initialize_distributed(seed=7)
    yield
    destroy_distributed()


def _model(attention: str = "vanilla"):
    seed_everything(5)
    return build_model(LlamaShape.from_yaml("tiny_gqa"), attention)


def _logits_BSV(model, tokens_BS: torch.Tensor) -> torch.Tensor:
    positions_BS = torch.arange(tokens_BS.shape[1]).expand_as(tokens_BS)
    out = model(tokens_BS, positions_BS, None)
    return (out[0] if isinstance(out, tuple) else out).detach()


def _tokens_BS() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _randomise_b(model) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for linear in adapted_linears(model):
            linear.lora_B.copy_(torch.randn(linear.lora_B.shape, generator=g) * 0.05)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("mlp", [False, True])
def test_fresh_adapters_are_the_original_and_merging_keeps_the_logits(mlp: bool):
    model, tokens_BS = _model(), _tokens_BS()
    keys = set(model.state_dict())
    original_BSV = _logits_BSV(model, tokens_BS)
    assert add_adapters(model, rank=4, alpha=8.0, mlp=mlp) == 4 * (4 if mlp else 2)
    assert torch.equal(_logits_BSV(model, tokens_BS), original_BSV)
    _randomise_b(model)
    adapted_BSV = _logits_BSV(model, tokens_BS)
    assert _relative(adapted_BSV, original_BSV) > 1e-3
    with adapters_disabled(model):
        assert torch.equal(_logits_BSV(model, tokens_BS), original_BSV)
    assert merge_adapters(model) == 4 * (4 if mlp else 2)
    assert set(model.state_dict()) == keys
    assert _relative(_logits_BSV(model, tokens_BS), adapted_BSV) <= 1e-5


def test_adapters_are_sharded_like_their_base_in_the_checkpoint():
    model = _model()
    add_adapters(model, rank=4, alpha=4.0)
    sharded = model.sharded_state_dict()
    qkv = "decoder.layers.0.self_attention.linear_qkv."
    proj = "decoder.layers.0.self_attention.linear_proj."
    assert sharded[qkv + "lora_B"].key.endswith("linear_qkv.lora_B")
    assert sharded[qkv + "lora_B"].global_shape[-2:] == (
        sharded[qkv + "weight"].global_shape[-2],
        4,
    )
    assert sharded[proj + "lora_A"].global_shape[-2:] == (
        4,
        sharded[proj + "weight"].global_shape[-1],
    )


@pytest.mark.parametrize(
    ("name", "sets"),
    [
        ("decoder.layers.0.self_attention.linear_qkv.weight", {"all", "attention"}),
        ("decoder.layers.0.self_attention.linear_proj.weight", {"all", "attention"}),
        ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", {"all"}),
        ("decoder.layers.0.self_attention.linear_qkv.lora_A", {"all", "lora"}),
        ("decoder.layers.0.mlp.linear_fc1.lora_B", {"all", "lora"}),
        ("decoder.layers.0.mlp.linear_fc1.weight", {"all"}),
        ("embedding.word_embeddings.weight", {"all"}),
        ("decoder.layers.0.self_attention.dmc_decision_proj.weight", {"all", "attention", "lora"}),
    ],
)
def test_trainable_sets(name: str, sets: set[str]):
    for trainable in ("all", "attention", "lora", "dmc-heads"):
        want = trainable in sets or (trainable == "dmc-heads" and "decision" in name)
        assert is_trainable(name, trainable) == want, (name, trainable)


def test_apply_trainable_freezes_all_but_the_adapters():
    model = _model()
    names = apply_trainable(model, RetrofitArgs(dmc_trainable="lora", dmc_lora_rank=2), seed=0)
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names)


def test_bad_lora_rank_is_refused():
    with pytest.raises(ValueError, match="rank"):
        RetrofitArgs(dmc_trainable="lora", dmc_lora_rank=0)
    with pytest.raises(ValueError, match="rank"):
        add_adapters(_model(), rank=-1, alpha=1.0)


def test_self_teacher_through_the_schedule_is_the_base_model_with_compression_off():
    """A heads-mode DMC model with trained-looking heads and adapters: the teacher's logits
    (compression off, adapters bypassed, run by the pipeline schedule) are the vanilla
    model's of the same base weights, and the student's decision statistics are untouched."""
    from megatron_dmc.ops import DMCConfig
    from megatron_dmc.training.teacher import Teacher

    vanilla, tokens_BS = _model(), _tokens_BS()
    seed_everything(5)
    config = LlamaShape.from_yaml("tiny_gqa")
    student = build_model(config, "dmc", DMCConfig(decision_source="heads", merge_delay=2))
    student.load_state_dict(vanilla.state_dict(), strict=False)
    add_adapters(student, rank=2, alpha=2.0)
    _randomise_b(student)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "dmc_decision_proj" in name:
                param.normal_(0, 0.5)
    student.train()
    positions_BS = torch.arange(tokens_BS.shape[1]).expand_as(tokens_BS)
    batches = [
        {"tokens": t, "position_ids": p} for t, p in zip(tokens_BS.split(1), positions_BS.split(1))
    ]
    student.collector.start_step(0)
    got = Teacher(None, tokens_BS.shape[1]).logits(student, batches, tokens_BS.shape[1], 1)
    want_BSV = _logits_BSV(vanilla, tokens_BS)
    assert _relative(torch.cat(got), want_BSV) <= 1e-6
    assert student.collector.local_stats() == {}
    assert _relative(_logits_BSV(student, tokens_BS), want_BSV) > 1e-3  # the student compresses
