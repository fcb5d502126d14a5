"""Named system prompts for the ``[META]:<name>`` and ``[REWARD_META]:<name>`` suffixes of ``ppo_datas``.

The table is the built-in one below, updated by ``dataset_config.system_prompts`` (a spec's entry of
the same name replaces the built-in text). The names are XTuner's; the texts are this project's own.

A prompt whose record already opens with a system message gets the named system prompt INSTEAD of
that message: many chat templates accept one system message, and only at the start, and the name in
the spec is the more deliberate choice of the two.

Pure Python: the launcher checks names without importing the data stack.
"""

from __future__ import annotations

from collections.abc import Mapping

Messages = list[dict[str, str]]

BUILTIN_SYSTEM_PROMPTS: dict[str, str] = {
    "default": "You are a capable assistant. Answer the user's request accurately and clearly.",
    "helpful": (
        "You are an assistant whose goal is to be as useful as possible: understand what the user needs, "
        "answer it directly and completely, and ask for details only when the request is ambiguous."
    ),
    "harmless": (
        "You are a careful assistant. Decline requests that could hurt people or break the law, say briefly "
        "why, and offer a safe alternative where one exists. Never invent facts."
    ),
    "hhh": (
        "You are an assistant that is helpful, honest and harmless: give useful, complete answers, say when "
        "you are unsure instead of guessing, and refuse to help with anything that could cause harm."
    ),
    "summarization": (
        "You write summaries. Keep the main points and any figures the text depends on, leave out details "
        "and repetition, and do not add opinions or facts that are not in the text."
    ),
    "reddit": (
        "You summarise forum posts. In a few sentences, say what the author describes, what they ask for, "
        "and the context a reader needs to answer them."
    ),
    "latex": (
        "You are a mathematics assistant. Reason step by step, write every formula in LaTeX ($...$ inline, "
        "$$...$$ displayed), and put the final answer in \\boxed{}."
    ),
    "math_ci": (
        "You are a mathematics assistant that can run Python code. Plan the solution, write code for the "
        "computations, read its output before you go on, and give the final answer in \\boxed{}."
    ),
}


class UnknownSystemPrompt(ValueError):
    """A ``[META]`` or ``[REWARD_META]`` name that the system prompt table lacks."""


def system_prompt_table(custom: Mapping[str, str] | None = None) -> dict[str, str]:
    """The built-in table updated by ``dataset_config.system_prompts`` (``custom``)."""
    return {**BUILTIN_SYSTEM_PROMPTS, **(custom or {})}


def describe_names(table: Mapping[str, str]) -> str:
    """The table's names, sorted, for messages: 'default, harmless, ...'."""
    return ", ".join(sorted(table))


def system_prompt(name: str, table: Mapping[str, str]) -> str:
    """The text of ``name``; UnknownSystemPrompt listing the names the table has when it lacks it."""
    try:
        return table[name]
    except KeyError:
        raise UnknownSystemPrompt(
            f"no system prompt named {name!r}; the table has {describe_names(table)}: use one of them, "
            "or add it under dataset_config.system_prompts"
        ) from None


def with_system_prompt(messages: Messages, text: str | None) -> Messages:
    """``messages`` opened by a system message of ``text``, which replaces a leading system message the
    record has; ``messages`` itself when ``text`` is None. A new list: ``messages`` is not modified."""
    if text is None:
        return messages
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    return [{"role": "system", "content": text}, *rest]
