"""The ablation end to end on the tiny preset (at one rank): two variants (the paper recipe,
with zero_out, and decision heads + distillation + frozen base + delay 8 + the efficient
recipe's LR multiplier + a calibrated threshold, without) train on the same data and steps,
are evaluated on the same protocols, and land in one table; the main job's report section
picks the table up."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_dmc.pipeline.layout import RunLayout
from megatron_dmc.pipeline.preset import PRESET_DIR
from megatron_dmc.pipeline.targets import section
from tests.assets.helpers import needs_gensim, needs_smollm2

pytestmark = [pytest.mark.slow, pytest.mark.dist, needs_gensim, needs_smollm2]
VARIANTS = ("paper", "heads+distill+frozen+delay8+lr10+calibrated")


def one_rank_tiny_preset(folder: Path) -> Path:
    """The tiny preset at TP=1: the variants' plumbing is what this test checks; the main
    job's test (test_job.py) runs the same steps with two tensor-parallel ranks."""
    values = yaml.safe_load((PRESET_DIR / "tiny.yaml").read_text())
    path = folder / "tiny_tp1.yaml"
    path.write_text(yaml.safe_dump({**values, "tensor_parallel": 1}))
    return path


def test_two_variants_train_on_the_same_budget_and_fill_the_table(tmp_path: Path) -> None:
    out, preset = tmp_path / "ablation", one_rank_tiny_preset(tmp_path)
    command = [sys.executable, "-m", "megatron_dmc.pipeline.ablation", "--preset", str(preset),
               "--targets", "2", "--variants", ",".join(VARIANTS), "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "ablation.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == list(VARIANTS)
    assert rows["paper"]["tokens"] == rows[VARIANTS[1]]["tokens"] > 0  # same token budget
    assert (out / "paper" / "train" / "zero_out").is_dir()
    assert not (out / VARIANTS[1] / "train" / "zero_out").exists()
    for row in rows.values():
        assert row["wall_s"] > 0 and row["final_achieved_cr"] > 1.0
        assert {"ppl_continuation", "ppl_strided", "ppl_matched_continuation"} <= set(row["ppl"])
        assert all(math.isfinite(v) for v in [*row["ppl"].values(), *row["rise"].values()])
        assert row["held_out_cr"] > 1.0
    assert "--dmc-merge-delay" in rows[VARIANTS[1]]["flags"]
    assert rows["paper"]["threshold"] is None and rows[VARIANTS[1]]["threshold"] is not None
    assert (out / VARIANTS[1] / "export" / "dmc_2x" / "calibration.json").is_file()
    table = (out / "ablation.md").read_text()
    assert all(f"| {v} | 2x |" in table for v in VARIANTS)
    summary = {"training": [], "preset": {}, "results": []}
    assert "## Ablation" in section(summary, RunLayout(tmp_path)) and VARIANTS[1] in table
