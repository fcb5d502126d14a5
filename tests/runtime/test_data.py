"""Tests for rlhf_launch/runtime/data.py: prompt sources, the deterministic mix, rendering and the tokenizer."""

import collections
import json
import os
import shutil
import socket
from pathlib import Path

import datasets
import datasets.config
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets.packaged_modules.json.json import Json
from transformers import AutoTokenizer

from rlhf_launch.core.config import DatasetConfig, TokenizerConfig
from rlhf_launch.demo import tiny_models
from rlhf_launch.runtime.data import (
    PromptDataError,
    PromptMix,
    load_prompt_source,
    load_tokenizer,
    parse_hh_dialogue,
    render_prompts,
    truncate_prompt,
)

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "data" / "prompts"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def write_jsonl(path: Path, records) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty, offline Hugging Face home per test. datasets and huggingface_hub read the variables at
    import, so their cache locations and flags are patched as well."""
    home = tmp_path / "hf_home"
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", home / "datasets" / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", home / "datasets" / "downloads" / "extracted")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return home


@pytest.fixture
def network_attempts(monkeypatch) -> list:
    """Records (and refuses) every attempt to open a connection or resolve a host name."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The tiny models' tokenizer, trained by the same function as ``tiny_models.build`` (in 0.02 s
    instead of the build's 12 s, which mostly trains the reward model)."""
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    tiny_models.train_tokenizer(tiny_models.load_prompt_messages()).save_pretrained(directory)
    return directory


@pytest.fixture
def tokenizer(tokenizer_dir):
    return load_tokenizer(TokenizerConfig(), str(tokenizer_dir))


# ------------------------------------------------------------------------------------- record shapes


def test_messages_record_drops_the_trailing_answer(tmp_path):
    chat = [system("Be brief."), user("Hi"), assistant("Hello!"), user("Name a colour."), assistant("Red.")]
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}, {"messages": chat[:2]}])
    assert load_prompt_source(source) == [chat[:4], chat[:2]]


def test_prompt_record_is_one_user_turn(tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Write a haiku."}, {"prompt": [user("Hi")]}])
    assert load_prompt_source(source) == [[user("Write a haiku.")], [user("Hi")]]


def test_bare_message_list_record(tmp_path):
    source = write_jsonl(tmp_path / "demo.jsonl", [[user("What is 2+2?")], [system("s"), user("u")]])
    assert load_prompt_source(source) == [[user("What is 2+2?")], [system("s"), user("u")]]


def test_hh_rlhf_multi_turn_record(tmp_path):
    text = (
        "\n\nHuman: Can you help me plan a picnic?"
        "\n\nAssistant: Sure! Where would you like to go?"
        "\n\nHuman:By the lake, on Sunday. "  # real hh-rlhf text sometimes has no space after the colon
        "\n\nAssistant: Bring a blanket and sandwiches."
    )
    source = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": text, "rejected": text + " Or not."}])
    assert load_prompt_source(source) == [
        [
            user("Can you help me plan a picnic?"),
            assistant("Sure! Where would you like to go?"),
            user("By the lake, on Sunday."),
        ]
    ]


def test_shipped_hh_style_sample():
    prompts = load_prompt_source(str(PROMPTS_DIR / "hh_style_sample.jsonl"))
    assert len(prompts) == 20
    assert prompts[0] == [user("How do I boil an egg?")]
    assert all(prompt[-1]["role"] == "user" for prompt in prompts)


def test_shipped_tiny_prompts():
    assert load_prompt_source(str(PROMPTS_DIR / "tiny_prompts.jsonl")) == tiny_models.load_prompt_messages()


def test_unknown_record_names_source_index_and_keys(tmp_path):
    source = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "ok"}, {"question": "?", "answer": "!"}])
    with pytest.raises(PromptDataError) as excinfo:
        load_prompt_source(source)
    message = str(excinfo.value)
    assert source in message and "record 1" in message and "['answer', 'question']" in message


@pytest.mark.parametrize(
    "record, complaint",
    [
        ({"messages": [system("s")]}, "no user turn"),
        ({"messages": [{"role": "robot", "content": "beep"}]}, "message 0"),
        ({"chosen": "no speakers here"}, "hh-rlhf"),
        ("just a string", "type str"),
    ],
)
def test_invalid_records(tmp_path, record, complaint):
    source = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(PromptDataError, match=complaint):
        load_prompt_source(source)


def test_parse_hh_dialogue_keeps_the_answer():
    assert parse_hh_dialogue("\n\nHuman: a\n\nAssistant: b") == [user("a"), assistant("b")]


# -------------------------------------------------------------------------------------- local files


RECORDS = [{"prompt": "one"}, {"messages": [user("two"), assistant("2")]}, {"prompt": "three"}]
EXPECTED = [[user("one")], [user("two")], [user("three")]]


def test_json_file_with_a_list(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(RECORDS))
    assert load_prompt_source(str(path)) == EXPECTED


def test_json_file_with_json_lines(tmp_path):
    path = tmp_path / "prompts.json"
    write_jsonl(path, RECORDS)
    assert load_prompt_source(str(path)) == EXPECTED


def test_parquet_file(tmp_path):
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "one"}, {"prompt": "two"}]), path)
    assert load_prompt_source(str(path)) == [[user("one")], [user("two")]]


def test_folder_reads_all_files_sorted(tmp_path):
    folder = tmp_path / "prompts"
    write_jsonl(folder / "b.jsonl", RECORDS[1:2])
    write_jsonl(folder / "a.jsonl", RECORDS[:1])
    (folder / "sub").mkdir()
    pq.write_table(pa.Table.from_pylist(RECORDS[2:]), folder / "sub" / "c.parquet")
    (folder / "notes.txt").write_text("not prompts")
    assert load_prompt_source(str(folder)) == EXPECTED


def test_folder_errors_name_the_file(tmp_path):
    folder = tmp_path / "prompts"
    write_jsonl(folder / "a.jsonl", [{"prompt": "fine"}])
    write_jsonl(folder / "b.jsonl", [{"text": "?"}])
    with pytest.raises(PromptDataError, match=r"record 1 \(in .*b\.jsonl\)"):
        load_prompt_source(str(folder))


def test_missing_local_path(tmp_path):
    with pytest.raises(PromptDataError, match="no such file"):
        load_prompt_source(str(tmp_path / "absent.jsonl"))


def test_invalid_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(PromptDataError, match="line 2"):
        load_prompt_source(str(path))


# --------------------------------------------------------------------------- Hugging Face, offline


def test_hub_name_missing_from_the_cache(monkeypatch, network_attempts):
    # Online as far as the environment says: load_prompt_source itself must switch to offline.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    with pytest.raises(PromptDataError) as excinfo:
        load_prompt_source("Anthropic/hh-rlhf/helpful-base")

    message = str(excinfo.value)
    assert "'Anthropic/hh-rlhf/helpful-base'" in message and "data_dir 'helpful-base'" in message
    assert "hf download --repo-type dataset Anthropic/hh-rlhf" in message and "local" in message
    # Our error, raised by rlhf_launch/runtime/data.py, not a traceback from deep inside datasets.
    assert excinfo.value.__cause__ is None and excinfo.value.__context__ is None
    assert Path(excinfo.traceback[-1].path).name == "data.py"
    assert network_attempts == []
    # The offline switch was temporary.
    assert datasets.config.HF_HUB_OFFLINE is False and huggingface_hub.constants.HF_HUB_OFFLINE is False
    assert "HF_HUB_OFFLINE" not in os.environ


HH_RECORDS = [
    {"chosen": f"\n\nHuman: question {i}?\n\nAssistant: answer {i}.", "rejected": "\n\nHuman: x\n\nAssistant: y"}
    for i in range(5)
]


def test_hub_dataset_from_the_datasets_cache(tmp_path, hf_home, network_attempts):
    """The cache entry an earlier load_dataset('Anthropic/hh-rlhf', data_dir='helpful-base') leaves,
    written by datasets' own json builder, under the folder name datasets' offline lookup searches."""
    source_file = write_jsonl(tmp_path / "train.jsonl", HH_RECORDS)
    staging = tmp_path / "staging"
    Json(
        cache_dir=str(staging),
        dataset_name="hh-rlhf",
        config_id="default-data_dir=helpful-base",
        data_files={"train": source_file},
        hash="0123456789abcdef",
    ).download_and_prepare()
    cached = hf_home / "datasets" / "Anthropic___hh-rlhf"
    cached.mkdir(parents=True)
    shutil.move(staging / "hh-rlhf" / "default-data_dir=helpful-base", cached)

    prompts = load_prompt_source("Anthropic/hh-rlhf/helpful-base")

    assert prompts == [[user(f"question {i}?")] for i in range(5)]
    assert network_attempts == []


def write_hub_snapshot(hub_cache: Path, repo: str, files: dict[str, str], commit: str = "c0ffee" * 6 + "abcd") -> None:
    """The layout `hf download --repo-type dataset REPO` leaves: refs/main -> commit, snapshot files
    as symlinks into blobs/."""
    repo_dir = hub_cache / f"datasets--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "blobs").mkdir()
    for number, (name, text) in enumerate(files.items()):
        blob = repo_dir / "blobs" / f"{number:040x}"
        blob.write_text(text)
        link = repo_dir / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def jsonl_text(records) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def test_hub_dataset_from_the_hub_file_cache(hf_home, network_attempts):
    write_hub_snapshot(
        hf_home / "hub",
        "tiny-org/chat-prompts",
        {
            "README.md": "# chat prompts\n",
            "part-a/train.jsonl": jsonl_text([{"prompt": "a1"}, {"prompt": "a2"}]),
            "part-a/test.jsonl": jsonl_text([{"prompt": "held out"}]),
            "part-b/train.jsonl": jsonl_text([{"prompt": "b1"}]),
        },
    )
    assert load_prompt_source("tiny-org/chat-prompts/part-a") == [[user("a1")], [user("a2")]]
    assert network_attempts == []
    with pytest.raises(PromptDataError, match="part-c"):
        load_prompt_source("tiny-org/chat-prompts/part-c")


# ---------------------------------------------------------------------------------------------- mix


def numbered_source(tmp_path: Path, name: str, count: int) -> str:
    return write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": f"{name}-{i}"} for i in range(count)])


def make_mix(tmp_path, sources: list[str], batch=8, seed=1024) -> PromptMix:
    return PromptMix(DatasetConfig(ppo_datas=sources, num_samples_each_epoch=batch, random_seed=seed))


@pytest.fixture
def two_sources(tmp_path) -> list[str]:
    return [numbered_source(tmp_path, "a", 10) + "::3", numbered_source(tmp_path, "b", 7) + "::1"]


def test_mix_weights_give_the_proportions(tmp_path, two_sources):
    mix = make_mix(tmp_path, two_sources, batch=16)
    assert mix.weights == [0.75, 0.25]
    counts = collections.Counter(source for step in range(250) for source, _ in mix.indices(step))
    assert sum(counts.values()) == 4000
    assert counts[0] / 4000 == pytest.approx(0.75, abs=0.025)  # ~3.7 standard deviations


def test_batch_size_and_shape(tmp_path, two_sources):
    batch = make_mix(tmp_path, two_sources, batch=5).batch(0)
    assert len(batch) == 5 and all(prompt[-1]["role"] == "user" for prompt in batch)


def test_mix_is_a_function_of_seed_and_step(tmp_path, two_sources):
    first, second = make_mix(tmp_path, two_sources), make_mix(tmp_path, two_sources)
    assert first.batch(5) == second.batch(5)
    assert first.batch(5) != first.batch(6)
    assert make_mix(tmp_path, two_sources, seed=7).batch(5) != first.batch(5)


def test_resumed_batches_equal_uninterrupted_ones(tmp_path, two_sources):
    uninterrupted = make_mix(tmp_path, two_sources)
    batches = [uninterrupted.batch(step) for step in range(12)]
    assert make_mix(tmp_path, two_sources).batch(11) == batches[11]  # resumed straight at step 11
    assert uninterrupted.batch(4) == batches[4]  # going back
    assert [uninterrupted.batch(step) for step in range(12)] == batches


def test_each_source_is_drawn_without_replacement_epoch_by_epoch(tmp_path, two_sources):
    mix = make_mix(tmp_path, two_sources, batch=6)
    drawn = collections.defaultdict(list)
    for step in range(40):
        for source, index in mix.indices(step):
            drawn[source].append(index)
    for source, size in ((0, 10), (1, 7)):
        epochs = [drawn[source][start : start + size] for start in range(0, len(drawn[source]) - size + 1, size)]
        assert len(epochs) >= 3
        assert all(sorted(epoch) == list(range(size)) for epoch in epochs)
        assert len({tuple(epoch) for epoch in epochs}) > 1  # reshuffled each epoch


def test_single_source_walks_its_permutation(tmp_path):
    mix = make_mix(tmp_path, [numbered_source(tmp_path, "only", 9)], batch=3)
    drawn = [index for step in range(3) for _, index in mix.indices(step)]
    assert sorted(drawn) == list(range(9))


# ---------------------------------------------------------------------------------------- rendering


def test_chat_template_rendering_and_left_padding(tokenizer):
    prompts = [[user("Hi")], [system("Be kind."), user("Tell me a long story about the moon.")]]
    batch = render_prompts(tokenizer, prompts, max_seq_len=512)
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    assert input_ids.dtype == attention_mask.dtype == torch.long
    assert input_ids.shape == attention_mask.shape and input_ids.shape[0] == 2

    generation_prompt = tokenizer.convert_tokens_to_ids("<|assistant|>")
    for row, messages in enumerate(prompts):
        length = int(attention_mask[row].sum())
        pad = input_ids.shape[1] - length
        assert attention_mask[row, :pad].tolist() == [0] * pad and attention_mask[row, pad:].all()
        assert input_ids[row, :pad].tolist() == [tokenizer.pad_token_id] * pad
        tokens = input_ids[row, pad:].tolist()
        assert tokens[-1] == generation_prompt
        assert tokens.count(tokenizer.bos_token_id) == 1 and tokens[0] == tokenizer.bos_token_id  # bos once
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tokenizer.decode(tokens) == expected
    assert attention_mask[0, 0] == 0 and attention_mask[1].all()  # the short prompt is the padded one


def test_truncation_keeps_the_last_tokens_behind_the_leading_bos(tokenizer):
    prompt = [user("Summarize the history of honey bees in two sentences.")]
    full = render_prompts(tokenizer, [prompt], max_seq_len=512)["input_ids"][0].tolist()
    assert len(full) > 6 and full[0] == tokenizer.bos_token_id
    short = render_prompts(tokenizer, [prompt, [user("Hi")]], max_seq_len=6)
    assert short["input_ids"].shape[1] == 6
    assert short["input_ids"][0].tolist() == [tokenizer.bos_token_id, *full[-5:]]
    assert short["attention_mask"][0].all()


def test_truncation_without_a_leading_bos_keeps_the_last_tokens(tokenizer):
    prompt = [user("Summarize the history of honey bees in two sentences.")]
    full = render_prompts(tokenizer, [prompt], max_seq_len=512, chat_template=CUSTOM_TEMPLATE)["input_ids"][0].tolist()
    assert len(full) > 6 and tokenizer.bos_token_id not in full
    short = render_prompts(tokenizer, [prompt], max_seq_len=6, chat_template=CUSTOM_TEMPLATE)["input_ids"][0].tolist()
    assert short == full[-6:]


def test_truncate_prompt_against_a_plain_loop():
    def expected(ids, max_len, bos):
        if len(ids) <= max_len:
            return list(ids)
        keep_bos = bos is not None and ids[0] == bos and max_len > 1  # one token left: the generation prompt's last
        room = max_len - 1 if keep_bos else max_len
        kept = [ids[position] for position in range(len(ids)) if position >= len(ids) - room]
        return [bos, *kept] if keep_bos else kept

    for ids in ([1, 5, 6, 7, 8], [5, 6, 7, 8], [1], [1, 1, 2], []):
        for max_len in (1, 2, 3, 10):
            for bos in (1, None):
                assert truncate_prompt(ids, max_len, bos) == expected(ids, max_len, bos), (ids, max_len, bos)


CUSTOM_TEMPLATE = (
    "{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_chat_template_override(tokenizer, tokenizer_dir):
    prompts = [[user("Hi")]]
    default = render_prompts(tokenizer, prompts, max_seq_len=512)["input_ids"][0].tolist()
    custom = render_prompts(tokenizer, prompts, max_seq_len=512, chat_template=CUSTOM_TEMPLATE)["input_ids"][0]
    assert custom.tolist() != default
    assert tokenizer.decode(custom.tolist()) == "[user] Hi\n[assistant]"

    overridden = load_tokenizer(TokenizerConfig(chat_template=CUSTOM_TEMPLATE), str(tokenizer_dir))
    assert render_prompts(overridden, prompts, max_seq_len=512)["input_ids"][0].tolist() == custom.tolist()


def test_plain_rendering_without_a_chat_template(tokenizer):
    tokenizer.chat_template = None
    tokens = render_prompts(tokenizer, [[system("Be brief."), user("Hi")]], max_seq_len=512)["input_ids"][0]
    assert tokenizer.decode(tokens.tolist()) == "System: Be brief.\nUser: Hi\nAssistant:"


# ---------------------------------------------------------------------------------------- tokenizer


def test_load_tokenizer_defaults(tokenizer_dir):
    tokenizer = load_tokenizer(TokenizerConfig(), str(tokenizer_dir))
    assert tokenizer.padding_side == "left"
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2)


def test_load_tokenizer_prefers_tokenizer_path(tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(TokenizerConfig(tokenizer_path=str(tokenizer_dir)), str(tmp_path / "no-model-here"))
    assert tokenizer.pad_token_id == 0


def test_pad_and_eos_overrides(tokenizer_dir):
    config = TokenizerConfig(pad_token_id=2, eos_token_id=4)
    tokenizer = load_tokenizer(config, str(tokenizer_dir))
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("</s>", 2)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|assistant|>", 4)
    batch = render_prompts(tokenizer, [[user("Hi")], [user("Hello there, how are you?")]], max_seq_len=512)
    assert batch["input_ids"][0, 0] == 2 and batch["attention_mask"][0, 0] == 0


def test_override_outside_the_vocabulary(tokenizer_dir):
    with pytest.raises(PromptDataError, match="pad_token_id is 100000"):
        load_tokenizer(TokenizerConfig(pad_token_id=100_000), str(tokenizer_dir))


def test_tokenizer_without_pad_token(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "no_pad")
    with pytest.raises(PromptDataError, match=r"tokenizer_config\.pad_token_id \(e\.g\. the eos id 2\)"):
        load_tokenizer(TokenizerConfig(), str(tmp_path / "no_pad"))
    assert load_tokenizer(TokenizerConfig(pad_token_id=2), str(tmp_path / "no_pad")).pad_token_id == 2


def test_tokenizer_that_is_not_available(tmp_path, network_attempts):
    with pytest.raises(PromptDataError, match="offline"):
        load_tokenizer(TokenizerConfig(), "some-org/not-downloaded-model")
    assert network_attempts == []
