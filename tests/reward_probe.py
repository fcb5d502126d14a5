"""Reward functions for the tests: they check that the record fields they receive belong to their rows.

Prompts of ``question_records`` read "Question I: what is I plus I?" with ``answer`` str(2 I); a row whose
answer does not match its own prompt fails the run."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rlhf_launch.runtime.rewards import vowel_score

CALLS: list[dict] = []  # what each call received, for tests that run the loop in this process


def question_records(path: Path, count: int = 40) -> Path:
    """A JSON-lines prompt source of ``count`` questions, each with its ``answer`` and a ``level`` field."""
    lines = [json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?", "answer": str(2 * i), "level": i % 3}) for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _check(prompts: list[str], answer: list[str]) -> None:
    if len(answer) != len(prompts):
        raise AssertionError(f"{len(answer)} answers for {len(prompts)} prompts")
    for prompt, given in zip(prompts, answer, strict=True):
        number = int(re.search(r"Question (\d+)", prompt).group(1))
        if given != str(2 * number):
            raise AssertionError(f"answer {given!r} reached the row of {prompt!r}")


def checked_answer(prompts: list[str], responses: list[str], answer: list[str]) -> list[float]:
    """Checks each row's ``answer`` against its prompt, then scores the response's vowels (scores that vary
    within a group, so that group estimators have something to learn)."""
    _check(prompts, answer)
    CALLS.append({"prompts": prompts, "answer": answer})
    return [vowel_score(r) for r in responses]


def every_field(prompts: list[str], responses: list[str], **fields) -> list[float]:
    """Takes every record field (``**fields``); checks ``answer`` and records the names it got."""
    _check(prompts, fields["answer"])
    CALLS.append({"prompts": prompts, **fields})
    return [vowel_score(r) for r in responses]


def texts_only(prompts: list[str], responses: list[str]) -> list[float]:
    """The old form: no record fields."""
    CALLS.append({"prompts": prompts})
    return [vowel_score(r) for r in responses]


def even_questions_constant(prompts: list[str], responses: list[str], answer: list[str]) -> list[float]:
    """Checks each row's ``answer``; scores 1.0 for every response to an even-numbered question (a group of equal
    rewards, which dynamic sampling drops) and the response's vowels otherwise."""
    _check(prompts, answer)
    scores = [1.0 if int(given) % 4 == 0 else vowel_score(r) for given, r in zip(answer, responses, strict=True)]
    CALLS.append({"prompts": prompts, "answer": answer, "scores": scores})
    return scores
