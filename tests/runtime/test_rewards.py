import random
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_launch.runtime import rewards
from rlhf_launch.runtime.reward_function import load_function
from rlhf_launch.runtime.rewards import brevity, vowel_ratio, vowel_score


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
    function = load_function("rlhf_launch.runtime.rewards:vowel_ratio")
    assert function(["q"], ["oak"]) == pytest.approx([2 * 2 / 3 - 1])


def test_importing_rewards_does_not_import_torch():
    code = "import sys, rlhf_launch.runtime.rewards; sys.exit('torch' in sys.modules)"
    repo_root = Path(__file__).resolve().parents[2]
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


# --------------------------------------------------------------------------- verifiable rewards
@pytest.mark.parametrize(("text", "found"), [
    ("The answer is 42.", "42"),
    ("first 3, then 4, so 7", "7"),
    ("so \\boxed{\\frac{1}{2}} and 9 later", "\\frac{1}{2}"),  # a boxed answer wins over a later number
    ("\\boxed{x^{2}+1}", "x^{2}+1"),  # nested braces
    ("\\boxed{12", "12"),  # unclosed: the last number
    ("total: 1,234 apples", "1,234"),
    ("no digits here", None),
])
def test_extract_answer(text, found):
    assert rewards.extract_answer(text) == found


@pytest.mark.parametrize(("a", "b"), [("42", "42.0"), ("84/2", "42"), ("0.50", "\\frac{1}{2}"), ("$1,000.", "1000"),
                                      ("-3/6", "\\dfrac{-1}{2}"), ("Paris", " paris ")])
def test_normalize_answer_makes_equal_answers_equal(a, b):
    assert rewards.normalize_answer(a) == rewards.normalize_answer(b)


def test_normalize_answer_keeps_different_answers_apart():
    assert len({rewards.normalize_answer(x) for x in ["42", "43", "4.2", "1/2", "paris", "1,2"]}) == 6


def test_math_answer_scores_against_the_record_field():
    responses = ["It is 17.", "I think 16", "\\boxed{17}", ""]
    assert rewards.math_answer(["p"] * 4, responses, answer=["17"] * 4) == [1.0, 0.0, 1.0, 0.0]
    assert rewards.math_answer_boxed(["p"] * 4, responses, answer=["17"] * 4, level=[1] * 4) == [1.0, 0.0, 1.1, 0.0]
    with pytest.raises(ValueError, match="answers"):
        rewards.math_answer(["p"], ["1"], answer=[])


def test_the_arithmetic_set_has_right_answers_and_a_held_out_split():
    import json
    import re

    from tests.conftest import ROOT

    def solve(prompt: str, level: int) -> int:  # the numbers in the order the story gives them
        n = [int(x) for x in re.findall(r"\d+", prompt)]
        return {1: lambda: n[0] + n[1], 2: lambda: n[0] + n[1] - n[2], 3: lambda: n[0] * n[1] + n[2] - n[3]}[level]()

    splits = {}
    for name in ("arithmetic_train", "arithmetic_test"):
        records = [json.loads(line) for line in (ROOT / "data" / "prompts" / f"{name}.jsonl").read_text().splitlines()]
        assert {r["level"] for r in records} == {1, 2, 3}
        assert [int(r["answer"]) for r in records] == [solve(r["prompt"], r["level"]) for r in records]
        assert all(int(r["answer"]) >= 0 for r in records)
        splits[name] = {r["prompt"] for r in records}
    assert not splits["arithmetic_train"] & splits["arithmetic_test"]
