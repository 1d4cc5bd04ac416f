"""An odd vocabulary (101) at TP=2: the converter pads the embedding and output rows to
Megatron's multiple (make_vocab_size_divisible_by * TP), training runs on the padded model,
and export strips the padding again."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from megatron.core import dist_checkpointing

from megatron_dmc.convert.commands import compare_hf_dirs, export_hf, import_hf
from megatron_dmc.convert.hf_io import HFCheckpoint
from megatron_dmc.distributed import initialize_distributed
from megatron_dmc.schema.checkpoint import read_metadata, resolve_iteration_dir
from megatron_dmc.schema.llama import LlamaShape
from tests.convert.helpers import write_tiny_llama
from tests.convert.megatron_helpers import hf_logits, megatron_logits
from tests.convert.test_logits import relative_error
from tests.dist_utils import run_distributed

VOCAB = 101
TOKENS_BT = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))


def test_padded_vocab_size_follows_megatron() -> None:
    config = LlamaShape(VOCAB, 48, 80, 2, 6, 2, 8)
    assert config.padded_vocab_size(1) == VOCAB
    assert config.padded_vocab_size(2) == 256
    assert dataclasses.replace(config, make_vocab_size_divisible_by=8).padded_vocab_size(2) == 112
    assert dataclasses.replace(config, vocab_size=96).padded_vocab_size(2) == 96
    with pytest.raises(ValueError, match="make_vocab_size_divisible_by must be >= 1"):
        dataclasses.replace(config, make_vocab_size_divisible_by=0)


def _embedding_rows(ckpt: Path) -> int:
    tensors = dist_checkpointing.load_tensors_metadata(str(resolve_iteration_dir(ckpt)))
    return tensors["embedding.word_embeddings.weight"].global_shape[0]


def _logits_and_one_step(ckpt: str, model_yaml: str, save: str) -> torch.Tensor | None:
    from tests.training.helpers import TINY_SHARED, train

    initialize_distributed(2, 1)
    logits = megatron_logits(ckpt, TOKENS_BT)
    argv = [*TINY_SHARED, "--model", model_yaml, "--tensor-model-parallel-size", "2"]
    argv += ["--dmc-stage", "plain", "--plain-iters", "1", "--load", ckpt, "--finetune"]
    train([*argv, "--save", save])
    return logits


@pytest.mark.slow
@pytest.mark.dist
def test_odd_vocabulary_at_tp2_imports_trains_and_exports(tmp_path: Path) -> None:
    hf = write_tiny_llama(tmp_path / "hf", seed=7, vocab_size=VOCAB)
    meg = import_hf(hf, tmp_path / "meg", tensor_parallel=2)
    assert _embedding_rows(meg) == 256 and read_metadata(meg)["llama"]["vocab_size"] == VOCAB
    assert len(compare_hf_dirs(hf, export_hf(meg, tmp_path / "back"))) == 21

    shape = LlamaShape.from_dict(read_metadata(meg)["llama"])
    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text(yaml.safe_dump(shape.to_dict()))
    run = tmp_path / "run"
    by_rank = run_distributed(
        _logits_and_one_step, world_size=2, args=(str(meg), str(model_yaml), str(run))
    )
    assert relative_error(by_rank[1], hf_logits(hf, TOKENS_BT)) <= 1e-5
    assert _embedding_rows(run) == 256

    trained = HFCheckpoint(export_hf(run, tmp_path / "trained"))
    embed = trained.tensor("model.embed_tokens.weight")
    assert embed.shape == (VOCAB, 48) and torch.isfinite(embed).all()
    before = HFCheckpoint(hf).tensor("model.embed_tokens.weight")
    assert not torch.equal(embed, before)  # the step reached the real rows
