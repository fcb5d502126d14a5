import importlib
import random
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.rewards import brevity, vowel_ratio, vowel_score


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("aeiou", 1.0),
        ("AEIOU", 1.0),
        ("bcd", -1.0),
        ("ab", 0.0),
        ("Hello", 2 * 2 / 5 - 1),
        ("Hi, you!", 2 * 3 / 5 - 1),  # punctuation and spaces are not letters
        ("yyy", -1.0),  # y is a consonant
        ("", -1.0),
        ("123 !?", -1.0),  # no letters at all
    ],
)
def test_vowel_score_known_answers(response, expected):
    assert vowel_score(response) == pytest.approx(expected)


def test_vowel_ratio_scores_each_response_and_ignores_prompts():
    scores = vowel_ratio(["p1", "a completely different prompt"], ["aa", "aa"])
    assert scores == [1.0, 1.0]
    assert all(isinstance(s, float) for s in scores)
    assert vowel_ratio([], []) == []


def test_vowel_ratio_rejects_unequal_lengths():
    with pytest.raises(ValueError):
        vowel_ratio(["p"], ["a", "b"])


def test_vowel_score_grows_when_a_consonant_becomes_a_vowel():
    rng = random.Random(0)
    for _ in range(200):
        letters = [rng.choice("bcdfghaeiou") for _ in range(rng.randint(1, 20))]
        consonants = [i for i, c in enumerate(letters) if c not in "aeiou"]
        if not consonants:
            continue
        before = vowel_score("".join(letters))
        letters[rng.choice(consonants)] = "e"
        assert vowel_score("".join(letters)) > before


def test_vowel_score_stays_in_range():
    rng = random.Random(1)
    alphabet = "abcdefghijklmnopqrstuvwxyz ,.!?0123456789ÄéØ"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert -1.0 <= vowel_score(text) <= 1.0


def test_resolvable_from_a_spec_string():
    module_name, _, function_name = "rlhf.rewards:vowel_ratio".partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    assert function(["q"], ["oak"]) == pytest.approx([2 * 2 / 3 - 1])


def test_importing_rewards_does_not_import_torch():
    code = "import sys, rlhf.rewards; sys.exit('torch' in sys.modules)"
    repo_root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=repo_root, check=False).returncode == 0


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("", 1.0),
        ("one", 1 - 1 / 25),
        (" ".join(["w"] * 25), 0.0),
        ("a  b\n c\td", 1 - 4 / 25),  # any whitespace separates words
        (" ".join(["w"] * 50), -1.0),
        (" ".join(["w"] * 80), -1.0),  # clipped
    ],
)
def test_brevity_known_answers(response, expected):
    assert brevity(["prompt"], [response]) == [pytest.approx(expected)]


def test_brevity_is_fewer_words_better_for_every_length():
    scores = brevity(["p"] * 60, [" ".join(["w"] * n) for n in range(60)])
    assert all(a >= b for a, b in zip(scores, scores[1:], strict=False))
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        brevity(["a", "b"], ["x"])
