"""The reward-function contract (rlhf_launch/runtime/reward_function.py), which the pre-flight check and the reward
role share: loading a 'module:function' name (old module names included), the signature, the scores."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from rlhf_launch.core.problems import InputError
from rlhf_launch.runtime import rewards
from rlhf_launch.runtime.dist import failure_line
from rlhf_launch.runtime.reward_function import (
    LEGACY_MODULES,
    RewardFunctionError,
    call_function,
    current_name,
    field_lists,
    import_function,
    load_function,
    scores_problem,
    signature_problem,
)
from tests.conftest import ROOT


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    """A module of reward functions of a user's, one of whose siblings fails when imported."""
    (tmp_path / "user_rewards.py").write_text("def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('a bug at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("user_rewards", "broken_rewards"):
        sys.modules.pop(name, None)
    return "user_rewards"


# ------------------------------------------------------------------------------------------- loading
def test_a_name_loads_its_function(user_module):
    assert load_function("rlhf_launch.runtime.rewards:vowel_ratio") is rewards.vowel_ratio
    assert load_function(f"{user_module}:length")(["p"], ["abc"]) == [3.0]


@pytest.mark.parametrize("name", ["vowel_ratio", "brevity", "math_answer", "math_answer_boxed"])
def test_the_old_module_of_the_built_in_functions_loads_the_same_function(name):
    assert current_name(f"rlhf.rewards:{name}") == f"rlhf_launch.runtime.rewards:{name}"
    assert load_function(f"rlhf.rewards:{name}") is getattr(rewards, name)
    assert import_function(f"rlhf.rewards:{name}") is getattr(rewards, name)


def test_only_the_old_module_itself_is_renamed():
    for name in ("rlhf_launch.runtime.rewards:brevity", "my.rlhf.rewards:f", "rlhf.rewards_extra:f", "rlhf:rewards"):
        assert current_name(name) == name
    # every old module names one that exists now, and none of the old ones can be imported any more
    for old, new in LEGACY_MODULES.items():
        assert importlib.util.find_spec(new) is not None
        assert importlib.util.find_spec(old.partition(".")[0]) is None


def test_a_name_that_cannot_be_imported_is_an_input_error_naming_the_spec_key(user_module):
    with pytest.raises(RewardFunctionError) as caught:
        load_function("no_such_module:f")
    assert isinstance(caught.value, InputError)
    assert str(caught.value) == "model_configs.reward.reward_function: cannot load 'no_such_module:f': No module named 'no_such_module'"
    with pytest.raises(RewardFunctionError, match=r"cannot load 'user_rewards:missing': module 'user_rewards' has no attribute 'missing'"):
        load_function(f"{user_module}:missing")
    with pytest.raises(RewardFunctionError, match=r"cannot load 'rlhf.rewards:missing': module 'rlhf_launch.runtime.rewards' has no"):
        load_function("rlhf.rewards:missing")


def test_a_module_that_fails_when_imported_is_a_bug_of_it_not_an_input_error(user_module):
    with pytest.raises(RuntimeError, match="a bug at import") as caught:
        load_function("broken_rewards:f")
    assert not isinstance(caught.value, InputError)
    with pytest.raises(ModuleNotFoundError):  # the pre-flight reports whatever importing raised
        import_function("no_such_module:f")


def test_importing_the_contract_does_not_import_torch():
    code = "import sys, rlhf_launch.runtime.reward_function; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


# -------------------------------------------------------------------------------- signature and scores
def test_the_signature_names_the_parameter_it_cannot_fill():
    def one(texts):
        return texts

    def needs_answer(prompts, responses, answer):
        return responses

    def keyword_only(prompts, responses, *, level):
        return responses

    assert signature_problem(one) == " takes 1 positional parameter (texts), not 2"
    assert "third required parameter 'answer'" in signature_problem(needs_answer)
    assert signature_problem(needs_answer, {"answer"}) is None
    assert "required keyword-only parameter 'level'" in signature_problem(keyword_only)
    assert signature_problem(rewards.vowel_ratio) is None and signature_problem(rewards.math_answer, {"answer"}) is None


def test_field_lists_align_the_accepted_fields_with_the_rows():
    rows = [{"answer": "1", "level": 2}, {"answer": "3"}]
    assert field_lists(frozenset({"answer"}), rows) == {"answer": ["1", "3"]}
    assert field_lists(None, rows) == {"answer": ["1", "3"], "level": [2, None]}
    assert field_lists(frozenset(), rows) == {}


def test_scores_problem_names_what_was_returned():
    assert scores_problem([1, 2.5], 2) is None
    assert scores_problem((0.0,), 2) == "returned 1 scores for 2 responses, expected one per response"
    assert scores_problem(None, 2) == "returned None, expected a list of 2 numbers, one per response"
    assert scores_problem([float("inf"), 1.0], 2) == "returned score 0 = inf, expected a finite number"
    assert scores_problem([float("inf"), 1.0], 2, finite=False) is None
    assert scores_problem([1.0, "2"], 2) == "returned score 1 = '2' (a str), expected a number"


def test_a_reward_function_that_breaks_its_contract_in_a_rank_is_one_line():
    def one_arg(texts):
        return [0.0] * len(texts)

    def too_few(prompts, responses):
        return [1.0]

    def buggy(prompts, responses):
        return [len(None)] * len(responses)  # a TypeError of its own: a bug, kept as it is

    prompts, responses = ["p1", "p2"], ["r1", "r2"]
    with pytest.raises(InputError) as caught:
        call_function(one_arg, "my:one_arg", prompts, responses, {"answer": ["1", "2"]})
    assert failure_line("rlhf: rank 0", caught.value) == f"rlhf: rank 0: {caught.value}"  # one line, no traceback
    start = "model_configs.reward.reward_function: my:one_arg cannot be called with (prompts, responses, answer=...): "
    assert str(caught.value).startswith(start)
    assert "one_arg() got an unexpected keyword argument 'answer'; expected a function of (prompts, responses)" in str(caught.value)
    with pytest.raises(InputError, match=r"my:too_few returned 1 scores for 2 responses, expected one per response$"):
        call_function(too_few, "my:too_few", prompts, responses, {})
    with pytest.raises(InputError, match=r"my:a_str returned a str 'abc', expected a list of 2 numbers"):
        call_function(lambda p, r: "abc", "my:a_str", prompts, responses, {})
    with pytest.raises(TypeError) as caught:
        call_function(buggy, "my:buggy", prompts, responses, {})
    assert not isinstance(caught.value, InputError)
    assert call_function(lambda p, r: [1.0, float("nan")], "my:nan", prompts, responses, {})[0] == 1.0  # NaN: as before
