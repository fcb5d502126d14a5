"""Prompt sources as written in ``dataset_config.ppo_datas``:
'<source>[::<weight>][[META]:<name>][[REWARD_META]:<name>]'.

``[META]:<name>`` puts the named system prompt before the policy's input, ``[REWARD_META]:<name>``
before the reward model's input (names: rlhf_launch/core/system_prompts.py). XTuner writes the two in this
order; either order is read.

Pure Python: the launcher validates these without importing the data stack."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
SUFFIXES = {"META": "meta", "REWARD_META": "reward_meta"}  # suffix tag -> PromptSource field
# Any '[TAG]:' so that a misspelt or later-format tag ([SYS_PROMPT]:) is named rather than read as a weight.
_TAG = re.compile(r"\[([A-Za-z_]+)\]:")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # the names dataset_config.system_prompts accepts


@dataclass(frozen=True)
class PromptSource:
    """One ``ppo_datas`` entry: a Hugging Face dataset or local path, its weight (> 0, not normalised),
    and the names of its policy (``meta``) and reward-model (``reward_meta``) system prompts."""

    source: str
    weight: float
    meta: str | None = None
    reward_meta: str | None = None

    def entry(self) -> str:
        """The entry as text that ``parse_source`` reads back to this same value (weight digits included)."""
        suffixes = "".join(f"[{tag}]:{getattr(self, field)}" for tag, field in SUFFIXES.items() if getattr(self, field))
        weight = f"{self.weight:g}"
        if float(weight) != self.weight:  # ':g' keeps 6 digits; repr keeps every digit the user wrote
            weight = repr(self.weight)
        return f"{self.source}::{weight}{suffixes}"


def parse_source(entry: str) -> PromptSource:
    """'Anthropic/hh-rlhf/helpful-base::1.0[META]:helpful' -> PromptSource(..., 1.0, meta='helpful');
    the weight defaults to 1. ValueError saying what was found and expected for a malformed entry."""
    head, names = _split_suffixes(entry)
    source, sep, weight_text = head.rpartition("::")
    if not sep:
        source, weight_text = head, "1"
    if not source.strip():
        raise ValueError(f"found {entry!r}, expected '<dataset or path>::<weight>', e.g. 'data/prompts.jsonl::1.0'")
    try:
        weight = float(weight_text)
    except ValueError:
        raise ValueError(f"found weight {weight_text!r} in {entry!r}, expected a number after '::'") from None
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"found weight {weight_text} in {entry!r}, expected a weight > 0")
    return PromptSource(source.strip(), weight, **names)


def _split_suffixes(entry: str) -> tuple[str, dict[str, str]]:
    """(the entry before its first '[TAG]:' suffix, {PromptSource field: name} of the suffixes)."""
    head, *parts = _TAG.split(entry)
    names: dict[str, str] = {}
    for tag, name in zip(parts[::2], parts[1::2], strict=True):
        if tag not in SUFFIXES:
            raise ValueError(f"found the suffix '[{tag}]:' in {entry!r}, expected '[META]:<name>' or '[REWARD_META]:<name>'")
        if SUFFIXES[tag] in names:
            raise ValueError(f"found '[{tag}]:' twice in {entry!r}, expected it at most once")
        if not _NAME.match(name.strip()):
            raise ValueError(
                f"found '[{tag}]:{name}' in {entry!r}, expected a system prompt name (letters, digits, '_', '.', '-') after "
                f"'[{tag}]:', e.g. '[{tag}]:default'"
            )
        names[SUFFIXES[tag]] = name.strip()
    return head, names


def looks_local(path: str) -> bool:
    """A path the user means as a local file or folder rather than a Hugging Face id."""
    return path.startswith(("/", "./", "../", "~")) or path.endswith(LOCAL_SUFFIXES)
