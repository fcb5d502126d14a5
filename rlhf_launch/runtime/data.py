"""The prompt pipeline of the PPO engine: sources -> chat messages -> a mix -> token batches.

- ``load_prompt_source``: one ``ppo_datas`` source (local file or folder, or a Hugging Face dataset from
  the local cache) as a list of prompts, each a list of chat messages ending with a user turn;
- ``PromptMix``: the rollout batch of every PPO step, a pure function of the seed and the step, each
  prompt with its source's ``[META]`` system prompt; ``reward_prompt`` the same prompt as the reward
  model reads it (its source's ``[REWARD_META]`` system prompt);
- ``render_prompts``: chat template (else ``plain_chat``'s "Role: content" lines), tokens, left truncation
  and left padding; ``encode_conversation`` a whole conversation (prompt and answer) for a reward model
  with a tokenizer of its own;
- ``load_tokenizer``: a tokenizer with its ``tokenizer_config`` overrides.

Nothing here downloads: Hugging Face names are resolved from the local caches only.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import huggingface_hub
import huggingface_hub.constants

from rlhf_launch.core.config import DatasetConfig, PretrainDatasetConfig, TokenizerConfig
from rlhf_launch.core.data_sources import LOCAL_SUFFIXES, looks_local, parse_source
from rlhf_launch.core.hub_cache import loadable_path
from rlhf_launch.core.problems import InputError
from rlhf_launch.core.system_prompts import UnknownSystemPrompt, system_prompt, system_prompt_table, with_system_prompt

# torch and transformers are imported inside the functions that use them: the launcher's
# pre-flight check (rlhf_launch/frontend/preflight/) reads and checks records with this module in seconds.

if TYPE_CHECKING:
    import datasets

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


class PromptDataError(InputError, ValueError):
    """A prompt source, record or tokenizer that cannot be used, with what to do about it."""


# ------------------------------------------------------------------------------------------ records


def record_to_prompt(record: Any, where: str) -> Messages:
    """One record -> the prompt's messages, ending with a user turn.

    Accepted shapes:
    - ``{"messages": [...]}``: a chat; trailing assistant turns (the answer) are dropped;
    - ``{"prompt": "..."}``: one user turn (a list of messages is taken as a chat);
    - ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ..."}`` (Anthropic hh-rlhf): the Human/Assistant
      turns without the last answer;
    - ``[{"role": "user", "content": ...}, ...]``: a bare chat (XTuner's demo format).
    """
    if isinstance(record, list):
        return prompt_part(checked_messages(record, where), where)
    if isinstance(record, dict):
        for key in ("messages", "prompt", "chosen"):
            value = record.get(key)
            if isinstance(value, list):
                return prompt_part(checked_messages(value, where), where)
            if key == "prompt" and isinstance(value, str):
                return [{"role": "user", "content": value}]
            if key == "chosen" and isinstance(value, str):
                return prompt_part(parse_hh_dialogue(value, where), where)
        raise PromptDataError(f"{where}: unrecognised record with keys {sorted(record)}; {_EXPECTED_SHAPES}")
    raise PromptDataError(f"{where}: unrecognised record of type {type(record).__name__}; {_EXPECTED_SHAPES}")


_EXPECTED_SHAPES = (
    "expected {'messages': [...]}, {'prompt': '...'}, hh-rlhf {'chosen': '\\n\\nHuman: ...'} "
    "or a list of {'role', 'content'} messages"
)


def checked_messages(messages: list, where: str) -> Messages:
    """Role and content of each message (other keys dropped), checked."""
    checked = []
    for turn, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise PromptDataError(
                f"{where}: message {turn} is {message!r}, expected {{'role': one of {list(ROLES)}, 'content': str}}"
            )
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


def prompt_part(messages: Messages, where: str) -> Messages:
    """The chat without its trailing assistant turns, which must then end with a user turn."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    if not end or messages[end - 1]["role"] != "user":
        raise PromptDataError(f"{where}: the chat has no user turn to answer: {messages!r}")
    return messages[:end]


# Real hh-rlhf text sometimes lacks the space after the colon, hence ' ?'.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_dialogue(text: str, where: str = "hh-rlhf text") -> Messages:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [user a, assistant b] (contents stripped)."""
    head, *turns = _HH_TURN.split(text.strip())
    if head.strip() or not turns:
        raise PromptDataError(f"{where}: expected hh-rlhf text starting with '\\n\\nHuman:', found {text[:80]!r}")
    return [
        {"role": _HH_ROLES[speaker], "content": content.strip()}
        for speaker, content in zip(turns[::2], turns[1::2], strict=True)
    ]


# ------------------------------------------------------------------------------------------ sources


def load_prompt_source(source: str) -> list[Messages]:
    """All prompts of one source, in the source's order (``load_prompt_records`` without the records' other fields)."""
    return load_prompt_records(source)[0]


# The keys a record's prompt is read from (record_to_prompt): everything else is a field for the reward function.
PROMPT_KEYS = ("messages", "prompt", "chosen")


def record_fields(record: Any) -> dict[str, Any]:
    """A record's fields besides its prompt (e.g. ``answer`` of {"prompt": ..., "answer": "42"}); {} for a bare chat."""
    return {key: value for key, value in record.items() if key not in PROMPT_KEYS} if isinstance(record, dict) else {}


def load_prompt_records(source: str) -> tuple[list[Messages], list[dict[str, Any]]]:
    """All prompts of one source, in the source's order, and each record's other fields (``record_fields``).

    A source is local when it looks like a path (``rlhf_launch.core.data_sources.looks_local``) or exists on disk:
    a .jsonl/.json/.parquet file, or a folder whose files with those suffixes (recursively, sorted) are
    all read. Otherwise it is a Hugging Face dataset in XTuner's form ``owner/name[/data_dir]``
    (``Anthropic/hh-rlhf/helpful-base`` is repo ``Anthropic/hh-rlhf``, data_dir ``helpful-base``) whose
    ``train`` split is read from the local caches only, offline (see ``load_cached_hub_dataset``).
    """
    path = Path(source).expanduser()
    if looks_local(source) or path.exists():
        records = local_records(path, source)
    else:
        rows = load_cached_hub_dataset(source).to_list()
        records = ((f"record {index}", record) for index, record in enumerate(rows))
    prompts, fields = [], []
    for label, record in records:
        prompts.append(record_to_prompt(record, f"{source}: {label}"))
        fields.append(record_fields(record))
    if not prompts:
        raise PromptDataError(f"{source}: no prompts found")
    return prompts, fields


def local_records(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    """('record INDEX' in the source, plus ' (in FILE)' for folders; record) of a local file or folder."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise PromptDataError(f"{source}: no {'/'.join(LOCAL_SUFFIXES)} files in the folder {path}")
    elif path.is_file():
        files = [path]
    else:
        raise PromptDataError(f"{source}: no such file or folder ({path.resolve()})")
    index = 0
    for file in files:
        origin = f" (in {file})" if path.is_dir() else ""
        for record in read_records(file, source):
            yield f"record {index}{origin}", record
            index += 1


def read_records(file: Path, source: str) -> list[Any]:
    """Records of one file. A .json file holds a list of records (or one record), or JSON lines."""
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq  # only for .parquet sources: ~0.1 s off every rank's start

        return pq.read_table(file).to_pylist()
    if file.suffix not in (".json", ".jsonl"):
        raise PromptDataError(f"{source}: {file.name} is not a {'/'.join(LOCAL_SUFFIXES)} file")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            pass  # often JSON lines under a .json name
        else:
            return document if isinstance(document, list) else [document]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PromptDataError(f"{source}: {file}, line {number}: invalid JSON ({err})") from None
    return records


def split_hub_name(name: str) -> tuple[str, str | None]:
    """'owner/name/some/dir' -> ('owner/name', 'some/dir'); 'owner/name' -> ('owner/name', None)."""
    parts = [part for part in name.split("/") if part]
    if len(parts) <= 2:
        return "/".join(parts), None
    return "/".join(parts[:2]), "/".join(parts[2:])


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Offline mode for the duration of the block. datasets and huggingface_hub read HF_HUB_OFFLINE /
    HF_DATASETS_OFFLINE once, at import, so their module flags are switched along with the variables."""
    import datasets.config  # only for Hugging Face sources: ~1 s off every rank's start

    flags = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
             (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    saved_flags = [getattr(module, name) for module, name in flags]
    saved_env = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    try:
        for module, name in flags:
            setattr(module, name, True)
        os.environ.update(dict.fromkeys(saved_env, "1"))
        yield
    finally:
        for (module, name), value in zip(flags, saved_flags, strict=True):
            setattr(module, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_cached_hub_dataset(name: str) -> datasets.Dataset:
    """The ``train`` split of a Hugging Face dataset ``owner/name[/data_dir]``, offline, from:

    1. the datasets cache (``HF_DATASETS_CACHE``), which an earlier online
       ``datasets.load_dataset(repo, data_dir=...)`` fills;
    2. the hub file cache (``HF_HUB_CACHE``), which ``hf download --repo-type dataset REPO`` fills (and an
       online ``load_dataset`` too): the snapshot of the ``main`` revision, read as a local folder.

    datasets' own offline lookup (1) may miss a cache entry written with ``data_dir`` (its cache folder
    name then depends on the resolved file list), hence (2).
    """
    import datasets

    repo, data_dir = split_hub_name(name)
    failures = []
    with hub_offline():
        try:
            return datasets.load_dataset(repo, data_dir=data_dir, split="train")
        except Exception as err:  # datasets raises many kinds of errors for "not there"
            failures.append(f"datasets cache: {_one_line(err)}")
        try:
            snapshot = huggingface_hub.snapshot_download(
                repo, repo_type="dataset", local_files_only=True,
                allow_patterns=f"{data_dir}/*" if data_dir else None,
            )
            return datasets.load_dataset(snapshot, data_dir=data_dir, split="train")
        except Exception as err:
            failures.append(f"hub cache: {_one_line(err)}")
    raise PromptDataError(
        f"prompt source {name!r} (Hugging Face dataset {repo!r}"
        + (f", data_dir {data_dir!r}" if data_dir else "")
        + ") is not available offline on this machine. Download it into the Hugging Face cache on a machine "
        f"with network access and the same HF_HOME (e.g. `hf download --repo-type dataset {repo}`, or "
        f"datasets.load_dataset({repo!r}" + (f", data_dir={data_dir!r}" if data_dir else "")
        + ")), or give a local .jsonl/.json/.parquet file or folder instead. Tried: " + "; ".join(failures)
    )


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


# ---------------------------------------------------------------------------------------------- mix


class SourceWalk:
    """Deterministic batches of (source, item) from weighted sources of known sizes: the scheme of
    ``PromptMix`` (below), shared with ``PretrainMix``. Batch ``step`` of a named stream is a pure function of
    the seed, the stream, the step and the sources' sizes."""

    def __init__(self, sizes: list[int], weights: list[float], batch_size: int, seed: int):
        self._sizes, self.weights, self.batch_size, self.seed = sizes, weights, batch_size, seed
        # Per stream ("prompt": the steps' batches, "dynamic-prompt": dynamic sampling's further rounds,
        # "pretrain": PPO-ptx text): (step, samples per source before it), and (stream, source) -> (epoch, order).
        self._cursor_cache: dict[str, tuple[int, list[int]]] = {}
        self._permutation_cache: dict[tuple[str, int], tuple[int, list[int]]] = {}

    def _walk(self, stream: str, step: int) -> list[tuple[int, int]]:
        cursors = self._cursors_before(stream, step)
        picked = []
        for source in self._source_choices(stream, step):
            picked.append((source, self._prompt_index(stream, source, cursors[source])))
            cursors[source] += 1
        return picked

    def _source_choices(self, stream: str, step: int) -> list[int]:
        if len(self._sizes) == 1:
            return [0] * self.batch_size
        rng = random.Random(f"{stream}-mix:{self.seed}:{step}")
        return rng.choices(range(len(self._sizes)), weights=self.weights, k=self.batch_size)

    def _cursors_before(self, stream: str, step: int) -> list[int]:
        """Samples drawn from each source in the stream's batches 0..step-1 (a copy)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, found {step}")
        cached_step, cursors = self._cursor_cache.get(stream, (0, [0] * len(self._sizes)))
        if step < cached_step:
            cached_step, cursors = 0, [0] * len(self._sizes)
        cursors = list(cursors)
        for past in range(cached_step, step):
            for source in self._source_choices(stream, past):
                cursors[source] += 1
        self._cursor_cache[stream] = (step, list(cursors))
        return cursors

    def _prompt_index(self, stream: str, source: int, position: int) -> int:
        epoch, offset = divmod(position, self._sizes[source])
        cached = self._permutation_cache.get((stream, source))
        if cached is None or cached[0] != epoch:
            order = list(range(self._sizes[source]))
            random.Random(f"{stream}-order:{self.seed}:{source}:{epoch}").shuffle(order)
            cached = self._permutation_cache[(stream, source)] = (epoch, order)
        return cached[1][offset]


class PromptMix(SourceWalk):
    """The prompts of every PPO step, drawn from the weighted ``ppo_datas`` sources.

    ``batch(step)`` depends only on ``random_seed``, ``step`` and the sources' contents, so a run resumed
    at step k gets exactly the batches of an uninterrupted run, with no iterator state to save.

    The scheme, for B = ``num_samples_each_epoch`` and sources i = 0..n-1 with weights w_i:

    1. Source of each sample: ``random.Random(f"prompt-mix:{seed}:{step}").choices(range(n),
       weights=w, k=B)``; sample j of the step comes from source c_j (with n = 1 no draw is needed).
    2. Each source is walked as a stream: its epoch e is the permutation
       ``random.Random(f"prompt-order:{seed}:{i}:{e}").shuffle(list(range(len(source_i))))``, epochs
       back to back. Sample j takes the next unused position of source c_j's stream: the position is the
       number of samples drawn from that source in steps 0..step-1 plus those before j in this step. The
       earlier counts are replayed from the draws of steps 0..step-1 (cheap: no prompt is touched); a cache of the
       last counts makes consecutive steps O(B), and a resumed run pays the replay once.

    So every prompt of a source is used once before any is used twice, and over many steps the
    sources' shares of the samples approach the normalised weights.

    A source's ``[META]:<name>`` system prompt opens each of its prompts (replacing a system message
    the record opens with, rlhf_launch/core/system_prompts.py); ``[REWARD_META]:<name>`` does the same for
    the reward model's view of the prompt (``reward_prompt``).
    """

    def __init__(self, config: DatasetConfig):
        entries = [parse_source(entry) for entry in config.ppo_datas]
        if not entries:
            raise PromptDataError("dataset_config.ppo_datas is empty: give at least one prompt source")
        table = system_prompt_table(config.system_prompts)
        self.meta = [_system_text(entry.meta, table, i, "META") for i, entry in enumerate(entries)]
        self.reward_meta = [_system_text(entry.reward_meta, table, i, "REWARD_META") for i, entry in enumerate(entries)]
        self.sources = [entry.source for entry in entries]
        total = sum(entry.weight for entry in entries)
        self.weights = [entry.weight / total for entry in entries]
        loaded = [load_prompt_records(source) for source in self.sources]
        self.prompts = [prompts for prompts, _ in loaded]
        self.fields = [fields for _, fields in loaded]  # each record's other fields, for reward functions
        super().__init__([len(prompts) for prompts in self.prompts], self.weights, config.num_samples_each_epoch, config.random_seed)

    def batch(self, step: int) -> list[Messages]:
        """The ``num_samples_each_epoch`` prompts of PPO step ``step`` (0-based), as the policy reads
        them. The message lists may be the mix's own: copy them before modifying them."""
        return [self.policy_prompt(source, index) for source, index in self.indices(step)]

    def policy_prompt(self, source: int, index: int) -> Messages:
        """Prompt ``index`` of source ``source`` with the source's ``[META]`` system prompt, if any."""
        return with_system_prompt(self.prompts[source][index], self.meta[source])

    def reward_prompt(self, source: int, index: int) -> Messages:
        """The same prompt as the reward model reads it: with the source's ``[REWARD_META]`` system prompt
        when it has one, else exactly as the policy read it."""
        if self.reward_meta[source] is None:
            return self.policy_prompt(source, index)
        return with_system_prompt(self.prompts[source][index], self.reward_meta[source])

    def record_fields(self, source: int, index: int) -> dict[str, Any]:
        """The other fields of prompt ``index``'s record in source ``source`` (``record_fields``)."""
        return self.fields[source][index]

    @property
    def has_reward_meta(self) -> bool:
        """Whether any source gives the reward model a system prompt of its own."""
        return any(text is not None for text in self.reward_meta)

    def indices(self, step: int) -> list[tuple[int, int]]:
        """(source index, prompt index in that source) of each sample of ``step``."""
        return self._walk("prompt", step)

    def extra_indices(self, step: int, round: int, rounds: int) -> list[tuple[int, int]]:
        """The prompts of dynamic sampling's further round ``round`` (1 .. rounds-1) of ``step`` (0-based),
        ``rounds`` being rollout_config.dynamic_sampling_max_draws.

        They come from a stream of their own ("dynamic-prompt" in the seeds), walked like the steps' stream
        (each prompt once before any twice) with round r of step k as its batch number k * (rounds - 1) + r - 1:
        a pure function of (seed, step, round) however many groups earlier steps dropped, so a resumed run
        draws what the uninterrupted run drew with nothing to checkpoint. The two streams are independent: an
        extra round may repeat a prompt of its step's first round."""
        if not 1 <= round < rounds:
            raise ValueError(f"extra round {round} outside 1..{rounds - 1}")
        return self._walk("dynamic-prompt", step * (rounds - 1) + round - 1)


class PretrainMix(SourceWalk):
    """The pretraining text of PPO-ptx (``pretrain_dataset_config``): each step's batch of
    ``num_samples_each_epoch`` token sequences, drawn from the weighted ``pretrain_datas`` sources by the scheme
    of ``PromptMix`` (stream "pretrain", seeded by the config's ``random_seed``): a pure function of (seed,
    step), every text used once before any twice, nothing to checkpoint.

    A record is a ``{"text": ...}`` (tokenized as it is, with the tokenizer's usual special tokens) or a chat
    ``{"messages": [...]}`` rendered whole, answer included (``encode_conversation``); a text longer than
    ``max_seq_len`` tokens keeps its first ones (right truncation: the start of a document reads on its own)."""

    def __init__(self, config: PretrainDatasetConfig, tokenizer, chat_template: str | None = None):
        entries = [parse_source(entry) for entry in config.pretrain_datas]
        if not entries:
            raise PromptDataError("pretrain_dataset_config.pretrain_datas is empty: give at least one text source")
        self.sources = [entry.source for entry in entries]
        self.texts = [load_text_source(source) for source in self.sources]
        total = sum(entry.weight for entry in entries)
        self.tokenizer, self.chat_template, self.max_seq_len = tokenizer, chat_template, config.max_seq_len
        super().__init__([len(texts) for texts in self.texts], [entry.weight / total for entry in entries],
                         config.num_samples_each_epoch, config.random_seed)

    def indices(self, step: int) -> list[tuple[int, int]]:
        """(source index, record index in that source) of each sequence of ``step`` (0-based)."""
        return self._walk("pretrain", step)

    def token_ids(self, step: int) -> list[list[int]]:
        """The token ids of each sequence of ``step`` (0-based), at most ``max_seq_len`` each."""
        return [self.encode(self.texts[source][index])[: self.max_seq_len] for source, index in self.indices(step)]

    def encode(self, item: str | Messages) -> list[int]:
        """Token ids of one text or chat, untruncated."""
        if isinstance(item, str):
            return self.tokenizer(item)["input_ids"]
        return encode_conversation(self.tokenizer, item, self.chat_template)

    def batch(self, step: int) -> dict:
        """``input_ids`` and ``attention_mask`` [N, T] of ``step``'s sequences, right-padded with the pad token."""
        import torch

        rows = self.token_ids(step)
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def record_to_text(record: Any, where: str) -> str | Messages:
    """A pretraining record: its ``text`` (a non-empty string), or its chat ``messages`` (used whole)."""
    if isinstance(record, dict):
        if isinstance(record.get("text"), str) and record["text"].strip():
            return record["text"]
        if isinstance(record.get("messages"), list) and record["messages"]:
            return checked_messages(record["messages"], where)
        keys = sorted(record)
    else:
        keys = type(record).__name__
    raise PromptDataError(f"{where}: found {keys}, expected a pretraining record {{'text': '...'}} or {{'messages': [...]}}")


def load_text_source(source: str) -> list[str | Messages]:
    """Every record of one pretraining source (local file or folder, or a cached Hugging Face dataset, as for
    prompts: ``load_prompt_records``) as a text or a chat."""
    path = Path(source).expanduser()
    if looks_local(source) or path.exists():
        records = local_records(path, source)
    else:
        records = ((f"record {index}", record) for index, record in enumerate(load_cached_hub_dataset(source).to_list()))
    texts = [record_to_text(record, f"{source}: {label}") for label, record in records]
    if not texts:
        raise PromptDataError(f"{source}: no pretraining texts found")
    return texts


def _system_text(name: str | None, table: dict[str, str], index: int, tag: str) -> str | None:
    if name is None:
        return None
    try:
        return system_prompt(name, table)
    except UnknownSystemPrompt as exc:
        raise PromptDataError(f"dataset_config.ppo_datas.{index}: [{tag}]:{name}: {exc}") from None


# ------------------------------------------------------------------------------------------- tokens


def render_prompts(tokenizer, prompts: list[Messages], max_seq_len: int, chat_template: str | None = None) -> dict:
    """Token batch of chat prompts: ``input_ids`` and ``attention_mask``, LongTensors [len(prompts), T].

    Each prompt is rendered with ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``
    (``chat_template``, the spec's ``tokenizer_config.chat_template``, replaces the tokenizer's) and
    tokenized without adding special tokens, since chat templates write their own (bos, ...). A
    tokenizer without any template renders "User: ...\\nAssistant: ...\\nUser: ...\\nAssistant:" instead
    (System: for system turns), tokenized with the tokenizer's usual special tokens.

    A prompt longer than ``max_seq_len`` tokens keeps its LAST ``max_seq_len`` tokens (truncation from
    the left: the generation prompt and the latest turn survive), except that a prompt rendered with a
    leading bos keeps it in front of them (``truncate_prompt``): a model trained with one reads every
    sequence from it. Rows are left-padded with the pad token, so that every row ends with its generation
    prompt.
    """
    import torch

    if tokenizer.pad_token_id is None:
        raise PromptDataError("the tokenizer has no padding token: set tokenizer_config.pad_token_id")
    if not prompts:
        raise ValueError("render_prompts needs at least one prompt")
    rows = [truncate_prompt(encode_prompt(tokenizer, messages, chat_template), max_seq_len, tokenizer.bos_token_id)
            for messages in prompts]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def truncate_prompt(ids: list[int], max_len: int, bos_token_id: int | None) -> list[int]:
    """A prompt's last ``max_len`` token ids; one that starts with the bos token keeps it first."""
    if len(ids) <= max_len:
        return ids
    if bos_token_id is not None and ids and ids[0] == bos_token_id and max_len > 1:
        return [ids[0], *ids[len(ids) - max_len + 1:]]
    return ids[len(ids) - max_len:]


def encode_prompt(tokenizer, messages: Messages, chat_template: str | None = None) -> list[int]:
    """Token ids of one prompt, ending with the generation prompt (see ``render_prompts``)."""
    return _encode_chat(tokenizer, messages, chat_template, generation_prompt=True)


def encode_conversation(tokenizer, messages: Messages, chat_template: str | None = None) -> list[int]:
    """Token ids of a whole conversation ending with the answer to score (no generation prompt), as
    ``encode_prompt`` renders prompts: the chat template, else the "Role: content" lines."""
    return _encode_chat(tokenizer, messages, chat_template, generation_prompt=False)


def _encode_chat(tokenizer, messages: Messages, chat_template: str | None, generation_prompt: bool) -> list[int]:
    if chat_template is None and not tokenizer.chat_template:
        return tokenizer(plain_chat(messages, generation_prompt))["input_ids"]
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=False, chat_template=chat_template
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def plain_chat(messages: Messages, generation_prompt: bool = False) -> str:
    """The rendering for tokenizers without a chat template: one "Role: content" line per message (System:,
    User:, Assistant:), and with ``generation_prompt`` a last "Assistant:" line that the answer follows."""
    turns = [f"{message['role'].capitalize()}: {message['content']}" for message in messages]
    return "\n".join([*turns, "Assistant:"] if generation_prompt else turns)


def render_chat_template(messages: Messages, chat_template: str, generation_prompt: bool, special_tokens: dict[str, str]) -> str:
    """One chat rendered through a Jinja chat template by the renderer of transformers' ``apply_chat_template``
    (which imports no torch), the tokenizer's ``special_tokens`` (bos_token, ...) given to the template: for
    readers of a tokenizer.json that load no transformers tokenizer, such as the pre-flight's."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=chat_template, add_generation_prompt=generation_prompt,
                                        **special_tokens)
    return rendered[0]


def equivalent_tokenizers(a, b) -> bool:
    """Whether two loaded tokenizers turn every text into the same ids and back: the same vocabulary and
    pipeline (tokenizer.json), special tokens and chat template. Tokenizers without a tokenizer.json
    pipeline (slow ones) are compared by identity only."""
    if a is b:
        return True
    if not (hasattr(a, "backend_tokenizer") and hasattr(b, "backend_tokenizer")):
        return False
    same_specials = all(getattr(a, name) == getattr(b, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id"))
    return same_specials and a.chat_template == b.chat_template and a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def load_tokenizer(tokenizer_config: TokenizerConfig, default_path: str, key: str = "tokenizer_config"):
    """The tokenizer at ``tokenizer_config.tokenizer_path`` (default: ``default_path``, the actor's
    model_path): a local folder or a model id in the local Hugging Face cache, never downloaded.

    ``from_pretrained_kwargs`` go to ``AutoTokenizer.from_pretrained`` as they are, with ``trust_remote_code``
    (a tokenizer class of its own code, named in its tokenizer_config.json's auto_map). Applies the overrides
    ``pad_token_id`` / ``bos_token_id`` / ``eos_token_id`` (through the token string of that id, so that
    the token and its id stay consistent) and ``chat_template``; pads on the left. ``key`` is where the
    settings are in the spec (``model_configs.reward.tokenizer_config``), for messages.
    """
    from transformers import AutoTokenizer

    path = os.path.expanduser(tokenizer_config.tokenizer_path or default_path)
    kwargs = {**tokenizer_config.from_pretrained_kwargs, "padding_side": "left", "local_files_only": True,
              "trust_remote_code": tokenizer_config.trust_remote_code}
    try:
        # a hub id reads the snapshot the pre-flight checked (core/hub_cache.py), whatever HF variables were at import
        tokenizer = AutoTokenizer.from_pretrained(loadable_path(path), **kwargs)
    except (OSError, ValueError, TypeError) as err:
        if "trust_remote_code" in str(err) and not tokenizer_config.trust_remote_code:
            raise PromptDataError(
                f"the tokenizer {path!r} runs on its own code (named in its tokenizer_config.json's auto_map), which this "
                f"spec does not allow to run; set {key}.trust_remote_code: true if you trust that code"
            ) from None
        raise PromptDataError(
            f"cannot load the tokenizer {path!r} offline ({_one_line(err)}). Give a local folder in "
            f"{key}.tokenizer_path, or download the model into the Hugging Face cache first"
            + (f"; check {key}.from_pretrained_kwargs" if tokenizer_config.from_pretrained_kwargs else "") + "."
        ) from None
    for name in ("pad", "bos", "eos"):
        token_id = getattr(tokenizer_config, f"{name}_token_id")
        if token_id is not None:
            setattr(tokenizer, f"{name}_token", _token_of(tokenizer, token_id, f"{key}.{name}_token_id"))
    if tokenizer_config.chat_template is not None:
        tokenizer.chat_template = tokenizer_config.chat_template
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        hint = f" (e.g. the eos id {tokenizer.eos_token_id})" if tokenizer.eos_token_id is not None else ""
        raise PromptDataError(
            f"the tokenizer {path!r} has no padding token: set {key}.pad_token_id{hint}"
        )
    return tokenizer


def _token_of(tokenizer, token_id: int, key: str) -> str:
    if not 0 <= token_id < len(tokenizer):
        raise PromptDataError(f"{key} is {token_id}, outside the vocabulary (size {len(tokenizer)})")
    return tokenizer.convert_ids_to_tokens(token_id)
