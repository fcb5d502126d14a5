"""System prompts of prompt sources: the '[META]:<name>' and '[REWARD_META]:<name>' suffixes of ppo_datas,
the table of names (rlhf_launch/core/system_prompts.py), the spec checks and the pre-flight rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_launch.core.config import DatasetConfig
from rlhf_launch.core.data_sources import PromptSource, parse_source
from rlhf_launch.core.problems import SpecError
from rlhf_launch.core.system_prompts import (
    BUILTIN_SYSTEM_PROMPTS,
    UnknownSystemPrompt,
    system_prompt,
    system_prompt_table,
    with_system_prompt,
)
from rlhf_launch.frontend.preflight import preflight
from rlhf_launch.runtime.data import PromptDataError, PromptMix
from tests.factory import TINY_PROMPTS, load, make_spec, reward_function

XTUNER_NAMES = ["default", "helpful", "harmless", "hhh", "summarization", "reddit", "latex", "math_ci"]


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


def errors_of(info) -> list[tuple[str, str]]:
    return [(p.path, p.message) for p in info.value.errors]


# ------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("data/p.jsonl", PromptSource("data/p.jsonl", 1.0)),
        ("data/p.jsonl::0.3333333333333", PromptSource("data/p.jsonl", 0.3333333333333)),
        ("data/p.jsonl::2[META]:helpful", PromptSource("data/p.jsonl", 2.0, meta="helpful")),
        ("Anthropic/hh-rlhf/helpful-base::0.125[META]:hhh[REWARD_META]:harmless",
         PromptSource("Anthropic/hh-rlhf/helpful-base", 0.125, "hhh", "harmless")),
        ("data/p.jsonl[REWARD_META]:math_ci", PromptSource("data/p.jsonl", 1.0, reward_meta="math_ci")),
        ("data/p.jsonl::1[REWARD_META]:a.b-c[META]:x_1", PromptSource("data/p.jsonl", 1.0, "x_1", "a.b-c")),
    ],
)
def test_entries_with_system_prompt_suffixes(entry, expected):
    assert parse_source(entry) == expected


@pytest.mark.parametrize("weight", [0.1, 1.0, 3.0, 0.3333333333333333, 1e-9, 123456.789012])
def test_entry_text_reads_back_to_the_same_source(weight):
    source = PromptSource("/abs/p.jsonl", weight, "helpful", "hhh")
    assert parse_source(source.entry()) == source
    assert parse_source(PromptSource("/abs/p.jsonl", weight).entry()).meta is None


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ("p.jsonl::1[SYS_PROMPT]:default", r"suffix '\[SYS_PROMPT\]:'.*expected '\[META\]:<name>'"),
        ("p.jsonl::1[META]:", r"expected a system prompt name"),
        ("p.jsonl::1[META]:a[META]:b", r"'\[META\]:' twice"),
        ("p.jsonl::x[META]:default", r"weight 'x'"),
        ("p.jsonl::0[META]:default", r"weight > 0"),
    ],
)
def test_malformed_entries(entry, complaint):
    with pytest.raises(ValueError, match=complaint):
        parse_source(entry)


# -------------------------------------------------------------------------------------------- table
def test_builtin_table_has_xtuners_names_with_texts_of_its_own():
    assert sorted(BUILTIN_SYSTEM_PROMPTS) == sorted(XTUNER_NAMES)
    assert all(text.strip() for text in BUILTIN_SYSTEM_PROMPTS.values())
    assert len(set(BUILTIN_SYSTEM_PROMPTS.values())) == len(XTUNER_NAMES)


def test_spec_prompts_extend_and_override_the_table():
    table = system_prompt_table({"pirate": "Talk like a pirate.", "default": "Mine."})
    assert table["pirate"] == "Talk like a pirate." and table["default"] == "Mine."
    assert table["hhh"] == BUILTIN_SYSTEM_PROMPTS["hhh"]
    assert BUILTIN_SYSTEM_PROMPTS["default"] != "Mine."  # the built-in table itself is untouched


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownSystemPrompt, match="'pirat'.*default, harmless, helpful, hhh, latex, math_ci, pirate"):
        system_prompt("pirat", system_prompt_table({"pirate": "Arr."}))


def test_system_prompt_replaces_a_leading_system_message():
    chat = [{"role": "system", "content": "old"}, {"role": "user", "content": "hi"}]
    assert with_system_prompt(chat, "new") == [{"role": "system", "content": "new"}, {"role": "user", "content": "hi"}]
    assert with_system_prompt(chat[1:], "new") == [{"role": "system", "content": "new"}, {"role": "user", "content": "hi"}]
    assert with_system_prompt(chat, None) is chat
    assert chat[0]["content"] == "old"  # the record is not modified


# ---------------------------------------------------------------------------------------- the mix
def two_sources(tmp_path: Path) -> tuple[str, str]:
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": f"question {i}"} for i in range(5)])
    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "system", "content": "record's own"}, {"role": "user", "content": f"chat {i}"}]} for i in range(5)
    ])
    return plain, chats


def test_mix_puts_each_sources_system_prompts_before_its_prompts(tmp_path):
    plain, chats = two_sources(tmp_path)
    config = DatasetConfig(num_samples_each_epoch=40, random_seed=3, system_prompts={"mine": "My own prompt."},
                           ppo_datas=[f"{plain}::0.5[META]:mine[REWARD_META]:hhh", f"{chats}::0.5"])
    mix = PromptMix(config)
    picks = mix.indices(0)
    assert {source for source, _ in picks} == {0, 1}
    for (source, index), prompt in zip(picks, mix.batch(0), strict=True):
        record = mix.prompts[source][index]
        assert prompt == mix.policy_prompt(source, index)
        if source == 0:
            assert prompt == [{"role": "system", "content": "My own prompt."}, *record]
            assert mix.reward_prompt(source, index) == [{"role": "system", "content": BUILTIN_SYSTEM_PROMPTS["hhh"]}, *record]
        else:
            assert prompt == record and prompt[0]["content"] == "record's own"
            assert mix.reward_prompt(source, index) == record
    assert mix.has_reward_meta


def test_mix_without_suffixes_gives_the_records_as_they_are(tmp_path):
    plain, chats = two_sources(tmp_path)
    mix = PromptMix(DatasetConfig(num_samples_each_epoch=8, ppo_datas=[plain, chats]))
    assert mix.batch(2) == [mix.prompts[s][i] for s, i in mix.indices(2)]
    assert not mix.has_reward_meta


def test_system_prompt_suffixes_do_not_change_which_prompts_are_drawn(tmp_path):
    plain, chats = two_sources(tmp_path)
    bare = PromptMix(DatasetConfig(num_samples_each_epoch=16, ppo_datas=[f"{plain}::1", f"{chats}::3"]))
    meta = PromptMix(DatasetConfig(num_samples_each_epoch=16, ppo_datas=[f"{plain}::1[META]:latex", f"{chats}::3[REWARD_META]:reddit"]))
    assert [bare.indices(step) for step in range(3)] == [meta.indices(step) for step in range(3)]


def test_mix_refuses_an_unknown_name_at_runtime_too(tmp_path):
    plain, _ = two_sources(tmp_path)
    with pytest.raises(PromptDataError, match=r"ppo_datas\.0: \[REWARD_META\]:nope: no system prompt named 'nope'"):
        PromptMix(DatasetConfig(ppo_datas=[f"{plain}[REWARD_META]:nope"]))


# ------------------------------------------------------------------------------------------- checks
def test_unknown_names_are_spec_errors_listing_the_table():
    with pytest.raises(SpecError) as info:
        load(**{"dataset_config.ppo_datas": [f"{TINY_PROMPTS}::1[META]:helpfull", f"{TINY_PROMPTS}::1[REWARD_META]:mine"],
                "dataset_config.system_prompts": {"mine": "Mine."}})
    assert len(info.value.errors) == 1
    path, message = errors_of(info)[0]
    assert path == "dataset_config.ppo_datas.0"
    assert "'[META]:helpfull'" in message and "did you mean 'helpful'" in message
    assert "default, harmless, helpful, hhh, latex, math_ci, mine, reddit, summarization" in message


def test_known_names_and_spec_defined_ones_validate():
    loaded = load(**{"dataset_config.ppo_datas": [f"{TINY_PROMPTS}::0.25[META]:hhh[REWARD_META]:mine"],
                     "dataset_config.system_prompts": {"mine": "Mine."}})
    assert [p for p in loaded.warnings if "ppo_datas" in p.path] == []


def test_reward_system_prompt_with_a_reward_function_is_warned_about():
    loaded = load(reward_function(), **{"dataset_config.ppo_datas": [f"{TINY_PROMPTS}::1[REWARD_META]:hhh"]})
    found = [p for p in loaded.warnings if p.path == "dataset_config.ppo_datas.0"]
    assert len(found) == 1 and "'[REWARD_META]:hhh' has no effect" in found[0].message


def test_malformed_suffix_is_a_spec_error():
    with pytest.raises(SpecError) as info:
        load(**{"dataset_config.ppo_datas": [f"{TINY_PROMPTS}::1[SYS_PROMPT]:default"]})
    assert [path for path, _ in errors_of(info)] == ["dataset_config.ppo_datas.0"]


def test_resolved_spec_keeps_the_suffixes_and_every_digit_of_the_weight():
    spec = make_spec(**{"dataset_config.ppo_datas": [f"{TINY_PROMPTS}::0.123456789[META]:hhh[REWARD_META]:latex"]})
    assert parse_source(spec.dataset_config.ppo_datas[0]) == PromptSource(str(TINY_PROMPTS), 0.123456789, "hhh", "latex")


# ---------------------------------------------------------------------------------------- pre-flight
def preflight_of(tmp_path, entries: list[str], **overrides):
    spec = make_spec(run_dir=tmp_path / "run", **overrides)
    spec.dataset_config.ppo_datas = entries  # set after resolution: absolute paths already
    return preflight(spec, tmp_path / "run", None, local=True)


def test_preflight_renders_a_sample_prompt_with_each_system_prompt(tmp_path):
    pf = preflight_of(tmp_path, [f"{TINY_PROMPTS}::1[META]:summarization[REWARD_META]:harmless"])
    assert not [p for p in pf.problems if p.severity == "error"], pf.problems
    notes = [n for n in pf.notes if n.startswith("dataset_config.ppo_datas.0 ")]
    assert any("[META]:summarization: a sample prompt renders to" in n for n in notes), pf.notes
    assert any("[REWARD_META]:harmless: a sample conversation renders to" in n for n in notes), pf.notes


def test_preflight_reports_a_chat_template_that_refuses_system_messages(tmp_path):
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                "{{ m['content'] }}{% endfor %}")
    pf = preflight_of(tmp_path, [f"{TINY_PROMPTS}::1[META]:default"], **{"tokenizer_config.chat_template": template})
    found = [p for p in pf.problems if p.path == "dataset_config.ppo_datas.0"]
    assert len(found) == 1 and found[0].severity == "error"
    assert "[META]:default: the chat template fails" in found[0].message and "no system role" in found[0].message
