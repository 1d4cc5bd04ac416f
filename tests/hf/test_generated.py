"""modeling_llama_dmc.py is generated from modular_llama_dmc.py and the package's own modules."""

import ast
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from megatron_dmc.hf import DMCCache, modular_llama_dmc
from tests.hf.helpers import dmc_model, fire_heads

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


def test_modular_source_runs_the_same_model():
    """The modular file imports the package and runs as it is; the generated one is the same
    model, so both give the same logits bitwise (heads and a delay exercise every import)."""
    model = fire_heads(dmc_model(dmc_decision_source="heads", dmc_merge_delay=2))
    modular = modular_llama_dmc.DMCLlamaForCausalLM(model.config).eval()
    modular.load_state_dict(model.state_dict())
    ids = torch.randint(3, 101, (2, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(modular(ids).logits, model(ids).logits)
        decoded = []
        for each, cache_class in ((modular, modular_llama_dmc.DMCCache), (model, DMCCache)):
            cache = cache_class(model.config)
            each(ids[:, :9], cache=cache)
            steps = [each(ids[:, t : t + 1], cache=cache).logits for t in range(9, 17)]
            decoded.append(torch.cat(steps, 1))
        assert torch.equal(*decoded)
