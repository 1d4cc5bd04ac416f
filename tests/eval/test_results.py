"""Results tables: markdown and JSON round trip, changes relative to vanilla, real CR and
peak KV bytes per protocol."""

import pytest

from megatron_dmc.eval.perplexity import PerplexityResult
from megatron_dmc.eval.results import format_markdown, load_results, make_row, write_results


def _ppl(protocol: str, nll: float, kv: int, real_cr: float = 1.0) -> PerplexityResult:
    settings = {"context_len": 32, "continuation_len": 8}
    return PerplexityResult(protocol, "m", 1.0, nll, 10, kv, 2 * kv, 1000, settings, real_cr)


def test_table_round_trip(tmp_path):
    matched = [_ppl("matched_strided", 2.2, 600, 1.9), _ppl("matched_continuation", 2.3, 600, 2)]
    rows = [
        make_row("vanilla", 1, [_ppl("strided", 2.0, 1000), _ppl("continuation", 2.0, 1000)]),
        make_row(
            "h2o",
            2,
            [_ppl("strided", 2.1, 500, 1.5), _ppl("continuation", 2.05, 500, 1.8), *matched],
            {"piqa": {"acc": 0.6, "acc_norm": 0.62}, "mmlu": {"acc": 0.25}},
        ),
    ]
    markdown = write_results(rows, tmp_path).read_text()
    assert markdown.count("\n") == 3 * (1 + 1 + 4 + 1) - 1  # 3 x (title, blank, table, blank)
    assert "compress after a dense prefill" in markdown and "matched protocols" in markdown
    assert "| h2o | 2x | 8.166 | +10.5% | 1.50 | 0.00 | 7.768 | +5.1% | 1.80 | 0.00 |" in markdown
    assert "| h2o | 2x | 9.025 | – | 1.90 | 0.00 | 9.974 | – | 2.00 | 0.00 |" in markdown
    assert "| vanilla | 1x | – | – | – | – | – | – | – | – |" in markdown  # matched not run
    assert "60.0" in markdown and "2.00x" in markdown and "ppl 32+8" in markdown
    assert load_results(tmp_path / "results.json") == rows
    assert rows[1].real_cr == {"strided": 1.5, "continuation": 1.8, "matched_strided": 1.9,
                               "matched_continuation": 2.0}  # fmt: skip
    assert rows[1].peak_kv_bytes["matched_continuation"] == 1200
    assert format_markdown(rows, metric="acc_norm").count("62.0") == 2  # piqa and CS avg


def test_fewer_kv_heads_count_in_the_real_cr():
    row = make_row("gqa", 3, [_ppl("continuation", 2.0, 100, 1.0)], dense_kv_bytes=3000)
    assert row.real_cr["continuation"] == pytest.approx(3.0) and row.dense_kv_bytes == 3000
