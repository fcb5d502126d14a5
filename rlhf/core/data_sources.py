"""Prompt sources as written in ``dataset_config.ppo_datas``: '<source>::<weight>'.

Pure Python: the launcher validates these without importing the data stack."""

from __future__ import annotations

import math
from dataclasses import dataclass

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class PromptSource:
    """One ``ppo_datas`` entry: a Hugging Face dataset or local path, and its weight (> 0, not normalised)."""

    source: str
    weight: float


def parse_source(entry: str) -> PromptSource:
    """'Anthropic/hh-rlhf/helpful-base::1.0' -> PromptSource(..., 1.0); the weight defaults to 1."""
    source, sep, weight_text = entry.rpartition("::")
    if not sep:
        source, weight_text = entry, "1"
    if not source.strip():
        raise ValueError(f"found {entry!r}, expected '<dataset or path>::<weight>', e.g. 'data/prompts.jsonl::1.0'")
    try:
        weight = float(weight_text)
    except ValueError:
        raise ValueError(f"found weight {weight_text!r} in {entry!r}, expected a number after '::'") from None
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"found weight {weight_text} in {entry!r}, expected a weight > 0")
    return PromptSource(source.strip(), weight)


def looks_local(path: str) -> bool:
    """A path the user means as a local file or folder rather than a Hugging Face id."""
    return path.startswith(("/", "./", "../", "~")) or path.endswith(LOCAL_SUFFIXES)
