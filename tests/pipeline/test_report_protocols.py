"""The report's protocol sections: lines with real CR per method, the rise-vs-CR plot."""

from __future__ import annotations

from megatron_dmc.pipeline.plots import _rise_points, plot_ppl_vs_cr
from megatron_dmc.pipeline.report import protocol_lines


def _rows() -> list[dict]:
    def row(method, cr, today, matched, real_today, real_matched):
        return {"method": method, "compression_ratio": cr, "ppl_continuation": today,
                "ppl_matched_continuation": matched,
                "real_cr": {"continuation": real_today, "matched_continuation": real_matched}}  # fmt: skip

    return [
        row("vanilla", 1.0, 10.0, 10.0, 1.0, 1.0),
        row("dmc", 2.0, 11.0, 11.0, 2.1, 2.1),
        row("h2o", 2.0, 10.1, 10.6, 1.8, 1.89),
        row("h2o", 4.0, 10.4, 12.0, 3.0, 3.43),
    ]


def test_protocol_lines_give_each_method_its_change_and_real_cr():
    lines = protocol_lines({"results": _rows()}, ("dmc", "h2o", "tova"), 2.0)
    assert len(lines) == 2  # the strided protocols were not measured
    assert lines[0].startswith("  - matched continuation:")
    assert "DMC +10.0% (real CR 2.10)" in lines[0] and "H2O +6.0% (real CR 1.89)" in lines[0]
    assert lines[0].endswith("TOVA –%")  # no TOVA row, no real CR
    assert "dense prefill" in lines[1] and "H2O +1.0% (real CR 1.80)" in lines[1]


def test_rise_vs_real_cr_plot(tmp_path):
    points = _rise_points(_rows(), "matched_continuation")
    assert list(points) == ["dmc", "h2o"]  # vanilla is the reference, not a point
    assert [cr for cr, _ in points["h2o"]] == [1.89, 3.43]
    assert [round(rise, 6) for _, rise in points["h2o"]] == [6.0, 20.0]
    path = plot_ppl_vs_cr(_rows(), tmp_path / "ppl_vs_cr.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
