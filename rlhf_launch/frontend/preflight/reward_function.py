"""The reward function (``model_configs.reward.reward_function``): it imports, accepts (prompts, responses) and
the record fields it names, and returns one finite number per response when called on two sample prompts and
responses. What it is held to, and how it is loaded, is the contract that the reward role applies too
(rlhf_launch/runtime/reward_function.py)."""

from __future__ import annotations

from rlhf_launch.core.problems import error
from rlhf_launch.frontend.preflight.findings import SAMPLE_PROMPT, SAMPLE_RESPONSES, Messages, Preflight
from rlhf_launch.runtime.reward_function import (
    EXPECTED_SIGNATURE,
    SPEC_KEY,
    accepted_fields,
    field_lists,
    import_function,
    scores_problem,
    signature_problem,
)


def check_reward_function(pf: Preflight, tokenizer) -> None:
    """``module:function`` imports, takes (prompts, responses), and returns one finite float per response."""
    path = pf.spec.model_configs.reward.reward_function
    if not path:
        return
    key = SPEC_KEY
    pf.at(key, path)
    try:
        fn = import_function(path)
    except Exception as exc:  # noqa: BLE001 - importing a user's module can raise anything
        pf.problems.append(error(key, f"cannot load {path!r}: {type(exc).__name__}: {exc}; expected 'module:function' importable here"))
        return
    known = {name for row in pf.fields for name in row}
    problem = signature_problem(fn, known)
    if problem:
        pf.problems.append(error(key, f"{path}{problem}; {EXPECTED_SIGNATURE}"))
        return
    prompts = [_prompt_text(tokenizer, m) for m in (pf.prompts[:2] or [SAMPLE_PROMPT] * 2)]
    prompts = (prompts * 2)[:2]
    rows = ((pf.fields[:2] or [{}]) * 2)[:2]  # the records of the sample prompts, as the reward role passes them
    try:
        scores = fn(prompts, list(SAMPLE_RESPONSES), **field_lists(accepted_fields(fn), rows))
    except Exception as exc:  # noqa: BLE001 - the user's function can raise anything
        pf.problems.append(error(key, f"{path} raised {type(exc).__name__}: {exc} when called on 2 sample prompts and responses"))
        return
    problem = scores_problem(scores, len(SAMPLE_RESPONSES))
    if problem:
        pf.problems.append(error(key, f"{path} called on 2 sample prompts and responses {problem}"))
    else:
        pf.notes.append(f"reward function {path}: {[round(float(s), 4) for s in scores]} for 2 sample responses")


def _prompt_text(tokenizer, messages: Messages) -> str:
    """A prompt as the reward function receives it: rendered and decoded without special tokens (the plain
    "Role: content" lines when the job's tokenizer did not load)."""
    if tokenizer is None:
        from rlhf_launch.runtime.data import plain_chat

        return plain_chat(messages, generation_prompt=True)
    return tokenizer.decode(tokenizer.encode(messages, None))
