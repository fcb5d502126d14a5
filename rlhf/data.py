"""The prompt pipeline of the PPO engine: sources -> chat messages -> a mix -> token batches.

- ``load_prompt_source``: one ``ppo_datas`` source (local file or folder, or a Hugging Face dataset from
  the local cache) as a list of prompts, each a list of chat messages ending with a user turn;
- ``PromptMix``: the rollout batch of every PPO step, a pure function of the seed and the step;
- ``render_prompts``: chat template, tokens, left truncation and left padding;
- ``load_tokenizer``: the tokenizer with the spec's ``tokenizer_config`` overrides.

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

from rlhf.core.config import DatasetConfig, TokenizerConfig
from rlhf.core.data_sources import LOCAL_SUFFIXES, looks_local, parse_source
from rlhf.core.problems import InputError

# torch and transformers are imported inside the functions that use them: the launcher's
# pre-flight check (launcher/preflight.py) reads and checks records with this module in seconds.

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
    """All prompts of one source, in the source's order.

    A source is local when it looks like a path (``rlhf.core.data_sources.looks_local``) or exists on disk:
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
    prompts = [record_to_prompt(record, f"{source}: {label}") for label, record in records]
    if not prompts:
        raise PromptDataError(f"{source}: no prompts found")
    return prompts


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


class PromptMix:
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
    """

    def __init__(self, config: DatasetConfig):
        entries = [parse_source(entry) for entry in config.ppo_datas]
        if not entries:
            raise PromptDataError("dataset_config.ppo_datas is empty: give at least one prompt source")
        self.sources = [entry.source for entry in entries]
        total = sum(entry.weight for entry in entries)
        self.weights = [entry.weight / total for entry in entries]
        self.prompts = [load_prompt_source(source) for source in self.sources]
        self.batch_size = config.num_samples_each_epoch
        self.seed = config.random_seed
        self._cursor_cache = (0, [0] * len(self.sources))  # (step, samples per source before it)
        self._permutation_cache: dict[int, tuple[int, list[int]]] = {}  # source -> (epoch, order)

    def batch(self, step: int) -> list[Messages]:
        """The ``num_samples_each_epoch`` prompts of PPO step ``step`` (0-based). The message lists are
        the mix's own: copy them before modifying them."""
        return [self.prompts[source][index] for source, index in self.indices(step)]

    def indices(self, step: int) -> list[tuple[int, int]]:
        """(source index, prompt index in that source) of each sample of ``step``."""
        cursors = self._cursors_before(step)
        picked = []
        for source in self._source_choices(step):
            picked.append((source, self._prompt_index(source, cursors[source])))
            cursors[source] += 1
        return picked

    def _source_choices(self, step: int) -> list[int]:
        if len(self.sources) == 1:
            return [0] * self.batch_size
        rng = random.Random(f"prompt-mix:{self.seed}:{step}")
        return rng.choices(range(len(self.sources)), weights=self.weights, k=self.batch_size)

    def _cursors_before(self, step: int) -> list[int]:
        """Samples drawn from each source in steps 0..step-1 (a copy)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, found {step}")
        cached_step, cursors = self._cursor_cache
        if step < cached_step:
            cached_step, cursors = 0, [0] * len(self.sources)
        cursors = list(cursors)
        for past in range(cached_step, step):
            for source in self._source_choices(past):
                cursors[source] += 1
        self._cursor_cache = (step, list(cursors))
        return cursors

    def _prompt_index(self, source: int, position: int) -> int:
        epoch, offset = divmod(position, len(self.prompts[source]))
        cached = self._permutation_cache.get(source)
        if cached is None or cached[0] != epoch:
            order = list(range(len(self.prompts[source])))
            random.Random(f"prompt-order:{self.seed}:{source}:{epoch}").shuffle(order)
            cached = self._permutation_cache[source] = (epoch, order)
        return cached[1][offset]


# ------------------------------------------------------------------------------------------- tokens


def render_prompts(tokenizer, prompts: list[Messages], max_seq_len: int, chat_template: str | None = None) -> dict:
    """Token batch of chat prompts: ``input_ids`` and ``attention_mask``, LongTensors [len(prompts), T].

    Each prompt is rendered with ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``
    (``chat_template``, the spec's ``tokenizer_config.chat_template``, replaces the tokenizer's) and
    tokenized without adding special tokens, since chat templates write their own (bos, ...). A
    tokenizer without any template renders "User: ...\\nAssistant: ...\\nUser: ...\\nAssistant:" instead
    (System: for system turns), tokenized with the tokenizer's usual special tokens.

    A prompt longer than ``max_seq_len`` tokens keeps its LAST ``max_seq_len`` tokens (truncation from
    the left: the generation prompt and the latest turn survive, the leading bos may not). Rows are
    left-padded with the pad token, so that every row ends with its generation prompt.
    """
    import torch

    if tokenizer.pad_token_id is None:
        raise PromptDataError("the tokenizer has no padding token: set tokenizer_config.pad_token_id")
    if not prompts:
        raise ValueError("render_prompts needs at least one prompt")
    rows = [encode_prompt(tokenizer, messages, chat_template)[-max_seq_len:] for messages in prompts]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def encode_prompt(tokenizer, messages: Messages, chat_template: str | None = None) -> list[int]:
    """Token ids of one prompt, ending with the generation prompt (see ``render_prompts``)."""
    if chat_template is None and not tokenizer.chat_template:
        return tokenizer(plain_prompt(messages))["input_ids"]
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, chat_template=chat_template
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def plain_prompt(messages: Messages) -> str:
    """The fallback rendering for tokenizers without a chat template."""
    turns = [f"{message['role'].capitalize()}: {message['content']}" for message in messages]
    return "\n".join([*turns, "Assistant:"])


def load_tokenizer(tokenizer_config: TokenizerConfig, default_path: str):
    """The tokenizer at ``tokenizer_config.tokenizer_path`` (default: ``default_path``, the actor's
    model_path): a local folder or a model id in the local Hugging Face cache, never downloaded.

    Applies the overrides ``pad_token_id`` / ``eos_token_id`` (through the token string of that id, so
    that the token and its id stay consistent) and ``chat_template``; pads on the left.
    """
    from transformers import AutoTokenizer

    path = os.path.expanduser(tokenizer_config.tokenizer_path or default_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", local_files_only=True)
    except (OSError, ValueError) as err:
        raise PromptDataError(
            f"cannot load the tokenizer {path!r} offline ({_one_line(err)}). Give a local folder in "
            "tokenizer_config.tokenizer_path, or download the model into the Hugging Face cache first."
        ) from None
    if tokenizer_config.pad_token_id is not None:
        tokenizer.pad_token = _token_of(tokenizer, tokenizer_config.pad_token_id, "pad_token_id")
    if tokenizer_config.eos_token_id is not None:
        tokenizer.eos_token = _token_of(tokenizer, tokenizer_config.eos_token_id, "eos_token_id")
    if tokenizer_config.chat_template is not None:
        tokenizer.chat_template = tokenizer_config.chat_template
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        hint = f" (e.g. the eos id {tokenizer.eos_token_id})" if tokenizer.eos_token_id is not None else ""
        raise PromptDataError(
            f"the tokenizer {path!r} has no padding token: set tokenizer_config.pad_token_id{hint}"
        )
    return tokenizer


def _token_of(tokenizer, token_id: int, key: str) -> str:
    if not 0 <= token_id < len(tokenizer):
        raise PromptDataError(f"tokenizer_config.{key} is {token_id}, outside the vocabulary (size {len(tokenizer)})")
    return tokenizer.convert_ids_to_tokens(token_id)
