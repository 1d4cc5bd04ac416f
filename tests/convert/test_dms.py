"""DMS exports (dmc_kv_method "dms"): HF -> Megatron -> HF keeps the method, bitwise, and a
DMS checkpoint continues only as DMS."""

import json
from pathlib import Path

import pytest

from megatron_dmc.convert.commands import compare_hf_dirs, export_hf, import_hf
from megatron_dmc.schema.checkpoint import read_metadata
from megatron_dmc.training.arguments import parse_args
from megatron_dmc.training.validate import validate
from tests.convert.helpers import edit_config, write_tiny_llama
from tests.convert.test_heads import write_heads_llama


@pytest.mark.slow
def test_dms_roundtrip_keeps_the_method_and_refuses_a_dmc_continuation(tmp_path: Path) -> None:
    hf = write_heads_llama(tmp_path / "hf", merge_delay=4)
    edit_config(hf, dmc_kv_method="dms", dmc_window_size=1)
    meg = import_hf(hf, tmp_path / "meg")
    dmc = read_metadata(meg)["dmc"]
    assert (dmc["kv_method"], dmc["window_size"], dmc["merge_delay"]) == ("dms", 1, 4)
    out = export_hf(meg, tmp_path / "out")
    assert compare_hf_dirs(hf, out)
    config = (out / "config.json").read_text()
    assert '"dmc_kv_method": "dms"' in config and '"dmc_window_size": 1' in config

    base = ["--model", "tiny_gqa", "--mock-data", "--seq-length", "32", "--load", str(meg)]
    heads = ["--dmc-decision-source", "heads", "--dmc-stage", "retrofit"]
    validate(parse_args([*base, *heads, "--kv-method", "dms"]), world_size=1)
    with pytest.raises(ValueError, match="trained with --kv-method dms"):
        validate(parse_args([*base, *heads]), world_size=1)


@pytest.mark.slow
def test_dms_query_roundtrip_has_no_heads_and_continues_only_as_query(tmp_path: Path) -> None:
    hf = write_tiny_llama(tmp_path / "hf")
    edit_config(
        hf,
        model_type="llama_dmc",
        dmc_kv_method="dms",
        dmc_decision_source="query",
        dmc_window_size=1,
        dmc_merge_delay=4,
    )
    meg = import_hf(hf, tmp_path / "meg")
    metadata = read_metadata(meg)
    assert metadata["llama"]["dmc_decision_heads"] is False
    dmc = metadata["dmc"]
    assert (dmc["kv_method"], dmc["decision_source"], dmc["merge_delay"]) == ("dms", "query", 4)
    out = export_hf(meg, tmp_path / "out")
    assert compare_hf_dirs(hf, out)
    config = json.loads((out / "config.json").read_text())
    assert (config["dmc_kv_method"], config["dmc_decision_source"]) == ("dms", "query")

    base = ["--model", "tiny_gqa", "--mock-data", "--seq-length", "32", "--load", str(meg)]
    query = ["--kv-method", "dms", "--dmc-decision-source", "query", "--dmc-stage", "retrofit"]
    validate(parse_args([*base, *query]), world_size=1)
    heads = ["--kv-method", "dms", "--dmc-decision-source", "heads", "--dmc-stage", "retrofit"]
    with pytest.raises(ValueError, match="trained with --dmc-decision-source query"):
        validate(parse_args([*base, *heads]), world_size=1)
