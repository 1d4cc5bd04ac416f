"""Runs shared by the training tests: built once, compared against many times."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training.helpers import run_tiny, save_initial_checkpoint


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny matmuls on shared cores run far faster without intra-op threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def initial(tmp_path_factory) -> Path:
    """The weights every run starts from."""
    return save_initial_checkpoint(tmp_path_factory.mktemp("init") / "ckpt")


@pytest.fixture(scope="session")
def reference(tmp_path_factory, initial) -> tuple[Path, dict[str, list]]:
    """TINY in one process: the run directory and its curves."""
    save = tmp_path_factory.mktemp("reference") / "run"
    return save, run_tiny(save, initial)
