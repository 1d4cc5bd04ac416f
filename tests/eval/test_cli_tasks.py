"""`python -m megatron_dmc.eval run` refuses bad task flags with one line and exit 2,
before loading any model."""

from __future__ import annotations

import pytest

from megatron_dmc.eval.cli import main


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--tasks", "needle", "--needle-depths", "0,2"], "depths"),
        (["--tasks", "needle", "--needle-tasks", "haystack"], "needle tasks"),
        (["--tasks", "humaneval,bogus"], "unknown tasks"),
        (["--tasks", "mmlu", "--mmlu-per-subject", "0"], "per_subject"),
    ],
)
def test_bad_flags_exit_2(flags, message, capsys, monkeypatch):
    import megatron_dmc.eval.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda path: pytest.fail("model loaded"))
    monkeypatch.setattr(cli, "_model_dir", lambda args: "unused")
    monkeypatch.setattr(cli, "load_tokenizer", lambda path: None)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1
