"""modeling_llama_dmc.py is generated from modular_llama_dmc.py and the package's own modules."""

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location(
    "generate_hf_modeling", ROOT / "tools/generate_hf_modeling.py"
)
generator = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = generator  # dataclasses look their module up there
SPEC.loader.exec_module(generator)


def test_committed_file_is_what_the_generator_writes():
    assert generator.GENERATED.read_text() == generator.generate(), (
        "megatron_dmc/hf/modeling_llama_dmc.py is stale: run python tools/generate_hf_modeling.py"
    )


def test_generated_file_imports_nothing_from_the_package():
    tree = ast.parse(generator.GENERATED.read_text())
    modules = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)] + [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    ]
    assert modules and not [m for m in modules if m.startswith("megatron_dmc")]


def test_maths_is_inlined_verbatim_from_ops():
    text = generator.GENERATED.read_text()
    source = (ROOT / "megatron_dmc/ops/accumulate.py").read_text()
    start = source.index("def windowed_partial_accumulation(")
    assert source[start:].rstrip() in text


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("import megatron_dmc.ops as dmc_ops", "no `as`, no plain `import`"),
        ("from megatron_dmc.ops import DMCConfig as Config", "no `as`, no plain `import`"),
        ("from megatron_dmc.ops.decisions import no_such_name", "neither defines nor re-exports"),
        (
            "from megatron_dmc.ops import apply_rope\n\n\ndef apply_rope(x):\n    return x",
            "redefines",
        ),
        (
            "def lazy():\n    from megatron_dmc.ops import apply_rope\n\n    return apply_rope",
            "still imports",
        ),
    ],
)
def test_generator_refuses_what_it_cannot_inline(tmp_path, line, message):
    modular = tmp_path / "modular.py"
    modular.write_text(f'"""A modular file."""\n\nfrom __future__ import annotations\n\n{line}\n')
    with pytest.raises(ValueError, match=message):
        generator.generate(modular)
