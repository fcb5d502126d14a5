#!/usr/bin/env bash
# Sets up a CPU-only development environment in .venv: CPU torch (pinned through a constraints
# file so that no other package can pull a CUDA build), the project with its test extras, and
# the tiny offline models that specs/tiny_cpu.yaml uses. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=.ci/constraints-cpu.txt

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
pip_install() { .venv/bin/pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" "$@"; }
echo "setup: installing torch (CPU build) and the project"
pip_install "torch==$(sed -n 's/^torch==//p' "$CONSTRAINTS")"
pip_install -e ".[test,deepspeed]"
.venv/bin/python -c "import torch, transformers, deepspeed, launcher, rlhf; print('setup: torch', torch.__version__, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"
echo "setup: building the tiny offline models"
.venv/bin/python -m rlhf.tiny_models
