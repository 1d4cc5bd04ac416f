import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megatron_dmc
from megatron_dmc.schema.checkpoint import (
    COMMON_FILE,
    FORMAT_VERSION,
    LATEST_FILE,
    METADATA_KEY,
    checkpoint_metadata,
    iteration_dir_name,
    read_metadata,
)
from megatron_dmc.schema.llama import LlamaShape, hf_config_from_shape, llama_shape_from_hf

SHAPE = LlamaShape(101, 32, 64, 2, 4, 2, 8)


def test_the_bottom_layer_imports_neither_megatron_nor_transformers():
    code = (
        "import sys, megatron_dmc.schema.llama, megatron_dmc.schema.checkpoint, megatron_dmc.ops\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('megatron', 'transformers')]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shape_survives_config_json():
    assert llama_shape_from_hf(hf_config_from_shape(SHAPE)) == SHAPE


def _write(root, metadata, iteration=5):
    (root / LATEST_FILE).write_text(str(iteration))
    folder = root / iteration_dir_name(iteration)
    folder.mkdir()
    torch.save({METADATA_KEY: metadata}, folder / COMMON_FILE)


def test_read_metadata_follows_the_latest_file(tmp_path):
    metadata = checkpoint_metadata(SHAPE, dmc={"window_size": 4, "target_cr": 2.0})
    _write(tmp_path, metadata)
    assert read_metadata(tmp_path) == metadata
    assert read_metadata(tmp_path / "iter_0000005") == metadata


def test_format_1_metadata_reads_with_the_current_names(tmp_path):
    old = {"format_version": 1, "llama": SHAPE.to_dict(), "dmc": {"compression_ratio": 4.0}}
    _write(tmp_path, old)
    read = read_metadata(tmp_path)
    assert read["dmc"] == {"target_cr": 4.0} and read["format_version"] == FORMAT_VERSION


def test_a_directory_without_metadata_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a torch_dist checkpoint"):
        read_metadata(tmp_path)


CONVERT_IMPORTERS = ("convert/", "pipeline/", "generate.py")
"""Who may import megatron_dmc.convert: itself, the main job and the command lines."""


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_only_the_pipeline_and_command_lines_import_the_converters():
    root = Path(megatron_dmc.__file__).parent
    offenders = [
        str(path.relative_to(root))
        for path in sorted(root.rglob("*.py"))
        if not str(path.relative_to(root)).startswith(CONVERT_IMPORTERS)
        and any(m.startswith("megatron_dmc.convert") for m in _imported_modules(path))
    ]
    assert offenders == []
