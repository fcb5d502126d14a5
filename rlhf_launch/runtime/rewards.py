"""Programmatic reward functions: ``fn(prompts, responses, **fields) -> list[float]``.

A spec refers to one as ``"rlhf_launch.runtime.rewards:<name>"``. They are cheap, deterministic and need no model,
which makes them useful for tests and for checking that PPO optimises what it is told to. What every reward
function must accept and return, and how one is loaded and checked, is rlhf_launch/runtime/reward_function.py.
"""

from __future__ import annotations

import re
from fractions import Fraction

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


# --------------------------------------------------------------------------- verifiable rewards
_BOXED = "\\boxed{"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_FRAC = re.compile(r"\\d?frac\{(-?\d+)\}\{(\d+)\}")  # \frac{1}{2} and \dfrac{1}{2}
FORMAT_BONUS = 0.1


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced; None when there is none or it is unclosed."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """A response's final answer: the content of its last ``\\boxed{...}``, else its last number; None if neither."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """A canonical form to compare answers by: spaces, '$', thousands commas and a trailing period dropped;
    a number written as its exact value (``42.0`` and ``84/2`` -> ``42``; ``0.50`` and ``\\frac{1}{2}`` -> ``1/2``);
    other text lower-cased."""
    text = answer.strip().strip("$").strip().rstrip(".").replace(" ", "")
    text = _FRAC.sub(r"\1/\2", text)
    number = text.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text) else text
    try:
        value = Fraction(number)
    except (ValueError, ZeroDivisionError):
        return text.lower()
    return str(value)


def _answer_scores(responses: list[str], answer: list[str], bonus: float) -> list[float]:
    if len(answer) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(answer)} answers")
    scores = []
    for response, expected in zip(responses, answer, strict=True):
        found = extract_answer(response)
        right = found is not None and normalize_answer(found) == normalize_answer(str(expected))
        scores.append((1.0 if right else 0.0) + (bonus if _last_boxed(response) is not None else 0.0))
    return scores


def math_answer(prompts: list[str], responses: list[str], answer: list[str], **fields) -> list[float]:
    """A verifiable reward: 1.0 when the response's final answer (``extract_answer``) equals the record's
    ``answer`` field after ``normalize_answer``, else 0.0. Records need an ``answer`` field, which reaches
    the function as a list aligned with the prompts; other fields are ignored."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return _answer_scores(responses, answer, 0.0)


def math_answer_boxed(prompts: list[str], responses: list[str], answer: list[str], **fields) -> list[float]:
    """``math_answer`` plus a format bonus of 0.1 for a response that puts its answer in ``\\boxed{...}``,
    so that a model learns the format before it learns to be right."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return _answer_scores(responses, answer, FORMAT_BONUS)
