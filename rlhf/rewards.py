"""Programmatic reward functions: ``fn(prompts, responses) -> list[float]``.

A spec refers to one as ``"rlhf.rewards:<name>"``. They are cheap, deterministic and need no model,
which makes them useful for tests and for checking that PPO optimises what it is told to.
"""

from __future__ import annotations

VOWELS = frozenset("aeiouAEIOU")


def vowel_score(text: str) -> float:
    """``2 * vowels / letters - 1`` over the letters of ``text`` (``str.isalpha``); -1 without letters.

    Vowels are a, e, i, o, u in either case ("y" counts as a consonant). The score is exactly in
    [-1, 1]: -1 for no vowels, 0 for half vowels, +1 for only vowels.
    """
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return -1.0
    vowels = sum(c in VOWELS for c in letters)
    return 2.0 * vowels / len(letters) - 1.0


def vowel_ratio(prompts: list[str], responses: list[str]) -> list[float]:
    """Reward responses for a high share of vowels among their letters (see ``vowel_score``).

    The prompt is ignored; it is part of the signature so every reward function is called alike.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [vowel_score(response) for response in responses]


BREVITY_WORDS = 25


def brevity(prompts: list[str], responses: list[str]) -> list[float]:
    """Reward short answers: ``1 - words / 25``, clipped to [-1, 1] (1 for an empty answer, 0 at
    25 words, -1 from 50 words on). A visible target for a chat model: its answers get shorter."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [max(-1.0, min(1.0, 1.0 - len(response.split()) / BREVITY_WORDS)) for response in responses]
