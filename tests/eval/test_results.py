"""Results table: markdown and JSON round trip, changes relative to vanilla."""

from megatron_dmc.eval.perplexity import PerplexityResult
from megatron_dmc.eval.results import format_markdown, load_results, make_row, write_results


def _ppl(protocol: str, nll: float, kv: int) -> PerplexityResult:
    return PerplexityResult(protocol, "m", 1.0, nll, 10, kv, kv, 1000)


def test_table_round_trip(tmp_path):
    rows = [
        make_row("vanilla", 1, _ppl("strided", 2.0, 1000), _ppl("continuation", 2.0, 1000)),
        make_row(
            "h2o",
            2,
            _ppl("strided", 2.1, 500),
            _ppl("continuation", 2.05, 500),
            {"piqa": {"acc": 0.6, "acc_norm": 0.62}, "mmlu": {"acc": 0.25}},
        ),
    ]
    markdown = write_results(rows, tmp_path).read_text()
    assert markdown.count("\n") == 4
    assert "| h2o | 2x |" in markdown and "60.0" in markdown and "2.00x" in markdown
    assert "+10.5%" in markdown  # exp(2.1) / exp(2.0) - 1
    assert load_results(tmp_path / "results.json") == rows
    assert format_markdown(rows, metric="acc_norm").count("62.0") == 2  # piqa and CS avg
