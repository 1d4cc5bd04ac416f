"""TP/PP: import written by 2 gloo ranks, logits at TP=2 and PP=2, bitwise resharding."""

from pathlib import Path

import pytest
import torch

from megatron_dmc.convert.commands import compare_hf_dirs, export_hf, import_hf, reshard
from megatron_dmc.convert.mapping import entries
from megatron_dmc.convert.megatron_io import MegatronCheckpoint
from megatron_dmc.distributed import initialize_distributed
from tests.convert.helpers import write_tiny_llama
from tests.convert.megatron_helpers import hf_logits, megatron_logits
from tests.convert.test_logits import relative_error
from tests.dist_utils import run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.dist]

TOKENS_BT = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel")
    gqa = write_tiny_llama(root / "gqa", seed=5)
    tied = write_tiny_llama(root / "tied", seed=6, tie_word_embeddings=True)
    return {
        "gqa": gqa,
        "tied": tied,
        "gqa_tp2": import_hf(gqa, root / "gqa_tp2", tensor_parallel=2),
        "tied_pp2": import_hf(tied, root / "tied_pp2", pipeline_parallel=2),
        "root": root,
    }


def _logits_body(ckpts: list[str], layouts: list[tuple[int, int]]) -> list[torch.Tensor | None]:
    out = []
    for ckpt in ckpts:
        for tp, pp in layouts:
            initialize_distributed(tp, pp)
            out.append(megatron_logits(ckpt, TOKENS_BT))
    return out


def test_logits_at_tp2_and_pp2(work: dict[str, Path]) -> None:
    names = ["gqa_tp2", "tied_pp2"]
    args = ([str(work[name]) for name in names], [(2, 1), (1, 2)])
    by_rank = run_distributed(_logits_body, world_size=2, args=args)
    assert by_rank[0][1] is None and by_rank[0][3] is None  # rank 0: first PP stage
    for k, name in enumerate(names):
        ref_BTV = hf_logits(work[name.split("_")[0]], TOKENS_BT)
        tp2_BTV, pp2_BTV = by_rank[1][2 * k : 2 * k + 2]  # rank 1: TP rank and last stage
        assert relative_error(tp2_BTV, ref_BTV) <= 1e-5, name
        assert relative_error(pp2_BTV, ref_BTV) <= 1e-5, name


def _all_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    with MegatronCheckpoint(ckpt_dir) as ckpt:
        return ckpt.read(list(entries(ckpt.shape)))


def test_reshard_tp2_tp1_tp2_is_bitwise(work: dict[str, Path]) -> None:
    tp1 = reshard(work["gqa_tp2"], work["root"] / "gqa_tp1")
    tp2 = reshard(tp1, work["root"] / "gqa_tp2_again", tensor_parallel=2)
    first, middle, last = (_all_tensors(d) for d in (work["gqa_tp2"], tp1, tp2))
    assert first.keys() == middle.keys() == last.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, middle[name]) and torch.equal(tensor, last[name]), name
    out = export_hf(tp2, work["root"] / "gqa_back")
    assert len(compare_hf_dirs(work["gqa"], out)) == 21
    assert len(compare_hf_dirs(work["tied"], export_hf(work["tied_pp2"], work["root"] / "t"))) == 20
