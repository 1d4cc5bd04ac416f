"""Faults: a NaN gradient (one process and on one rank of TP=2 / PP=2), a SIGKILL while
saving, damaged checkpoints (truncated shard, garbage tracker, missing common.pt), and
metrics.jsonl after a resume. Nothing bad is applied or saved; every error names the
place and what to do."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megatron.core import dist_checkpointing

from megatron_dmc.convert.megatron_io import process_group_of_one
from megatron_dmc.training import checkpoint as ckpt
from megatron_dmc.training import step
from megatron_dmc.training.damage import DamagedCheckpointError, checked_iteration_dir
from megatron_dmc.training.metrics import drop_records_after
from megatron_dmc.training.record import NonFiniteLossError
from tests.dist_utils import run_distributed
from tests.training.faults import poison_gradient
from tests.training.helpers import KEYS, TINY, metrics, run_tiny

TRACKER = "latest_checkpointed_iteration.txt"
NAN_AT_3 = r"non-finite gradient at iteration 3 \(stage retrofit\) with a finite loss; first in "


def _iterations(save: Path) -> list[int]:
    return [r["iteration"] for r in metrics(save)]


def _plain_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (weights and optimizer moments) by flattened key."""
    with process_group_of_one():
        nested = dist_checkpointing.load_plain_tensors(str(directory))
    flat: dict[str, torch.Tensor] = {}

    def walk(value, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}")
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(v, f"{key}/{i}")
        elif isinstance(value, torch.Tensor):
            flat[key] = value

    walk(nested, "")
    return flat


@pytest.mark.slow
def test_nan_gradient_is_neither_applied_nor_saved(initial, tmp_path, monkeypatch) -> None:
    seen: dict = {}
    monkeypatch.setattr(step, "run_batches", poison_gradient(3, 1, seen))
    save = tmp_path / "run"
    match = NAN_AT_3 + r"layer 1 \(mlp.linear_fc1.weight\); this update was not applied"
    with pytest.raises(NonFiniteLossError, match=match):
        run_tiny(save, initial, "--save-interval", "1")
    after = dict(seen["model"].named_parameters())
    assert all(torch.equal(after[n].detach(), p) for n, p in seen["before"].items())
    assert (save / TRACKER).read_text().strip() == "2"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000001", "iter_0000002"]
    assert _iterations(save) == [1, 2]


@pytest.mark.slow
def test_skip_nonfinite_steps_skips_the_update_and_counts_it(initial, tmp_path, monkeypatch):
    monkeypatch.setattr(step, "run_batches", poison_gradient(3, 1, {}))
    save = tmp_path / "run"
    run_tiny(save, initial, "--save-interval", "1", "--skip-nonfinite-steps", "1")
    records = metrics(save)
    assert _iterations(save) == [1, 2, 3, 4, 5]
    assert [r.get("skipped_iterations") for r in records] == [None, None, 1, None, None]
    assert records[2]["grad_norm"] is None
    before, after = _plain_tensors(save / "iter_0000002"), _plain_tensors(save / "iter_0000003")
    assert before.keys() == after.keys() and any("exp_avg" in k for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and Adam moments
    assert ckpt.read_common(save)["dmc_progress"]["skipped_iterations"] == 1


def _poisoned_layouts(root: str, init: str) -> list[str]:
    """PP=2, then TP=2: the NaN is written on rank 1 only (layer 3 / its TP shard)."""
    from tests.training.helpers import train

    real, messages = step.run_batches, []
    for name, flag in (("pp2", "--pipeline-model-parallel-size"), ("tp2", "--tensor-model-parallel-size")):  # fmt: skip
        step.run_batches = poison_gradient(3, 3, {}, rank=1)
        argv = [*TINY, flag, "2", "--save", f"{root}/{name}", "--load", init]  # fmt: skip
        try:
            train(argv, keep_world=True)
        except NonFiniteLossError as error:
            messages.append(str(error))
        finally:
            step.run_batches = real
    return messages


@pytest.mark.slow
@pytest.mark.dist
def test_nan_gradient_on_one_rank_stops_every_rank(initial, tmp_path) -> None:
    by_rank = run_distributed(_poisoned_layouts, 2, args=(str(tmp_path), str(initial)))
    assert by_rank[0] == by_rank[1] and len(by_rank[0]) == 2
    for message in by_rank[0]:
        assert message.startswith("non-finite gradient at iteration 3 (stage retrofit)")
        assert "first in layer 3 (mlp.linear_fc1.weight)" in message
    for name in ("pp2", "tp2"):
        assert (tmp_path / name / TRACKER).read_text().strip() == "2"
        assert not (tmp_path / name / "iter_0000003").exists()


def _assert_identical(got: list[dict], want: list[dict]) -> None:
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want]
    for a, b in zip(got, want):
        for key in KEYS:
            assert a.get(key) == b.get(key), (a["iteration"], key, a.get(key), b.get(key))


def _killed_run(save: Path, initial: Path, point: str, log: Path) -> tuple[int, str]:
    """Run tests.training.faults in its own process group; once it is dead, end what it
    left behind too (the torch_dist save starts a multiprocessing manager, which a
    SIGKILLed parent orphans)."""
    command = [sys.executable, "-m", "tests.training.faults", str(save), str(initial), point]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            returncode = proc.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return returncode, log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["shards", "tracker"])
def test_sigkill_while_saving_resumes_bit_identically(initial, reference, tmp_path, point):
    save = tmp_path / "run"
    returncode, log = _killed_run(save, initial, point, tmp_path / "killed.log")
    assert returncode == -signal.SIGKILL, log[-3000:]
    assert (save / TRACKER).read_text().strip() == "2"
    assert (save / ("iter_0000003.tmp" if point == "shards" else "iter_0000003")).is_dir()
    assert _iterations(save) == [1, 2, 3]  # iteration 3 was logged before its save
    run_tiny(save, initial, "--save-interval", "1")
    _assert_identical(metrics(save), metrics(reference[0]))
    assert not (save / "iter_0000003.tmp").exists()


def _run_root(initial: Path, tmp_path: Path) -> Path:
    """A run directory holding iterations 1, 2 and 3 (copies of a whole checkpoint)."""
    root = tmp_path / "run"
    for iteration in (1, 2, 3):
        shutil.copytree(initial / "release", ckpt.iteration_dir(root, iteration))
    (root / TRACKER).write_text("3\n")
    return root


def _truncate(directory: Path) -> Path:
    shard = sorted(directory.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    return shard


@pytest.mark.parametrize(
    ("damage", "message", "whole"),
    [
        ("shard", r"iter_0000003/__0_0.distcp: truncated \(1000 bytes, its index needs \d+\)", "1, 2"),
        ("tracker", "latest_checkpointed_iteration.txt: expected an iteration number or 'release', found 'x3'", "1, 2, 3"),
        ("common", "iter_0000003/common.pt: missing", "1, 2"),
    ],
)  # fmt: skip
def test_damaged_checkpoint_names_the_file_and_what_can_load(
    initial, tmp_path, damage, message, whole
):
    root = _run_root(initial, tmp_path)
    if damage == "shard":
        _truncate(root / "iter_0000003")
    elif damage == "tracker":
        (root / TRACKER).write_text("x3\n")
    else:
        (root / "iter_0000003" / "common.pt").unlink()
    listing = f"; complete iterations under {root}: {whole}; start from one with --ckpt-step N"
    with pytest.raises(DamagedCheckpointError, match=f"{message}{listing}$"):
        ckpt.read_common(root)
    assert checked_iteration_dir(root, 2) == root / "iter_0000002"
    assert ckpt.read_common(root, 2)["iteration"] == 0


def test_metrics_keep_each_iteration_once_after_a_resume(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"iteration": i, "lm_loss": 1.0 / i}) + "\n" for i in (1, 2, 3, 4)]
    path.write_text("".join(lines) + '{"iteration": 5, "lm_lo')  # torn by a kill
    drop_records_after(path, 2)
    assert path.read_text() == "".join(lines[:2])
    drop_records_after(tmp_path / "absent.jsonl", 2)
    assert not (tmp_path / "absent.jsonl").exists()


@pytest.mark.slow
def test_ckpt_step_resumes_before_a_truncated_save(initial, reference, tmp_path, capsys):
    from megatron_dmc.train import main

    save = tmp_path / "run"
    shutil.copytree(reference[0], save)
    shard = _truncate(save / "iter_0000005")
    assert main([*TINY, "--save", str(save), "--load", str(initial)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {shard}: truncated (1000 bytes")
    assert err.endswith(
        f"complete iterations under {save}: 2, 4; start from one with --ckpt-step N\n"
    )
    run_tiny(save, initial, "--ckpt-step", "4")
    _assert_identical(metrics(save), metrics(reference[0]))
    assert ckpt.read_common(save)["iteration"] == 5
