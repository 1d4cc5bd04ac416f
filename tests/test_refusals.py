"""Every command line refuses bad input with one line on stderr and exit status 2 (no
traceback unless --debug or MEGATRON_DMC_DEBUG=1), naming the right flag or path; and
export-hf, generate, bench and eval refuse weights holding NaN, naming the tensor."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from megatron_dmc.cli_errors import run
from tests.convert.helpers import edit_config, write_tiny_llama

POISONED = "model.layers.1.mlp.up_proj.weight"


def _refused(capsys, main, argv: list[str]) -> str:
    """The refusal of `main(argv)`: its one line (progress bars before it are fine)."""
    try:
        status = run(main, argv)
    except SystemExit as exited:  # a main that exits itself, as eval's does
        status = exited.code
    assert status == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n") and err.count("error: ") == 1, err
    line = err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert line.startswith("error: "), err
    return line


def test_run_maps_refusals_stops_and_bugs(capsys, monkeypatch) -> None:
    def refuse(argv):
        raise ValueError("bad\n  value")

    def stop(argv):
        raise FloatingPointError("non-finite loss")

    def bug(argv):
        raise KeyError("x")

    assert run(refuse, []) == 2 and capsys.readouterr().err == "error: bad value\n"
    assert run(stop, []) == 1 and capsys.readouterr().err == "error: non-finite loss\n"
    with pytest.raises(KeyError):
        run(bug, [])
    with pytest.raises(ValueError):
        run(refuse, ["--debug"])
    seen: list = []
    assert run(seen.append, ["--x", "--debug"]) == 0 and seen == [["--x"]]
    monkeypatch.setenv("MEGATRON_DMC_DEBUG", "1")
    with pytest.raises(ValueError):
        run(refuse, [])


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama, the same with a NaN in one tensor, and a DMC config of the latter."""
    root = tmp_path_factory.mktemp("hf")
    good = write_tiny_llama(root / "good")
    nan = Path(shutil.copytree(good, root / "nan"))
    weights = load_file(nan / "model.safetensors")
    weights[POISONED][0, 3] = float("nan")
    save_file(weights, nan / "model.safetensors", metadata={"format": "pt"})
    dmc = Path(shutil.copytree(nan, root / "dmc"))
    edit_config(dmc, model_type="llama_dmc", dmc_window_size=12, dmc_init_val=5.0)
    return {"good": good, "nan": nan, "dmc": dmc}


def test_generate_names_paths_and_flags(hf_dirs, tmp_path, capsys) -> None:
    from megatron_dmc.generate import main

    missing = tmp_path / "missing"
    err = _refused(capsys, main, ["--model-dir", str(missing), "--token-ids", "1"])
    assert str(missing / "config.json") in err and "--hf-dir" not in err
    broken = Path(shutil.copytree(hf_dirs["good"], tmp_path / "json"))
    (broken / "config.json").write_text('{"hidden_size": 48,')
    err = _refused(capsys, main, ["--model-dir", str(broken), "--token-ids", "1"])
    assert f"{broken / 'config.json'}: not valid JSON" in err
    cut = Path(shutil.copytree(hf_dirs["good"], tmp_path / "cut"))
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:100])
    err = _refused(capsys, main, ["--model-dir", str(cut), "--token-ids", "1"])
    assert f"{cut / 'model.safetensors'}: unreadable safetensors file" in err
    argv = ["--model-dir", str(hf_dirs["good"]), "--token-ids", "1", "--num-pages", "0"]
    assert "--num-pages must be >= 1" in _refused(capsys, main, argv)


def test_argparse_errors_are_one_line_too(capsys) -> None:
    from megatron_dmc.generate import main

    with pytest.raises(SystemExit) as exited:
        run(main, ["--model-dir"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: argument --model-dir: expected one argument")


@pytest.mark.parametrize("tool", ["generate", "eval", "bench"])
def test_nan_weights_are_refused_naming_the_tensor(hf_dirs, capsys, tool: str) -> None:
    if tool == "generate":
        from megatron_dmc.generate import main

        argv = ["--model-dir", str(hf_dirs["nan"]), "--token-ids", "1"]
    elif tool == "eval":
        from megatron_dmc.eval.cli import main

        argv = ["run", "--model", str(hf_dirs["nan"]), "--protocols", ""]
    else:
        from megatron_dmc.bench.__main__ import main

        argv = ["--model-dir", str(hf_dirs["dmc"]), "--skip", "a", "b", "c", "d"]
    err = _refused(capsys, main, argv)
    assert f"tensor {POISONED} has 1 non-finite values (NaN/inf)" in err


@pytest.mark.slow
def test_export_hf_refuses_nan_weights_and_writes_nothing(hf_dirs, tmp_path, capsys) -> None:
    from megatron_dmc.convert.cli import main
    from megatron_dmc.convert.commands import import_hf

    meg = import_hf(hf_dirs["nan"], tmp_path / "meg")
    out = tmp_path / "out"
    err = _refused(capsys, main, ["export-hf", "--load", str(meg), "--hf-dir", str(out)])
    assert "tensor decoder.layers.1.mlp.linear_fc1.weight has 1 non-finite values" in err
    assert not out.exists()
    (meg / "latest_checkpointed_iteration.txt").write_text("oops")
    err = _refused(capsys, main, ["export-hf", "--load", str(meg), "--hf-dir", str(out)])
    assert "latest_checkpointed_iteration.txt: expected an iteration number" in err


@pytest.mark.slow
def test_python_m_generate_prints_one_line_and_exits_2(tmp_path) -> None:
    command = [sys.executable, "-m", "megatron_dmc.generate", "--model-dir", str(tmp_path)]
    done = subprocess.run([*command, "--token-ids", "1"], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"error: {tmp_path / 'config.json'} not found: {tmp_path} is not a Hugging Face model "
        "directory"
    ]


def test_train_refuses_in_one_line(tmp_path, capsys) -> None:
    from megatron_dmc.train import main

    config = tmp_path / "run.yaml"
    config.write_text("dmc-stage: retrofitt\n")
    assert main(["--model", "tiny_gqa", "--mock-data", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --config {config}: argument --dmc-stage: invalid choice")
    assert err.count("\n") == 1
