"""The two readers of a tokenizer folder the pre-flight checks use, alike to their callers (size, special token
ids, prompts and conversations encoded as the runtime encodes them): ``FastTokenizer`` reads tokenizer.json
through the ``tokenizers`` library, without torch; ``HFTokenizer`` wraps the runtime's own transformers
tokenizer, for folders without tokenizer.json, settings only transformers applies, or a tokenizer class of its
own code (its tokenizer_config.json's ``auto_map``: loaded as the runtime loads it, with the settings'
``trust_remote_code``). ``load_preflight_tokenizer`` picks one."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_launch.core.problems import error
from rlhf_launch.frontend.preflight.findings import Messages, Preflight, one_line


class FastTokenizer:
    """A tokenizer folder read as the runtime's Hugging Face tokenizer reads it (tokenizer.json,
    tokenizer_config.json, chat template), through the ``tokenizers`` library: no torch."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = _json_file(folder / "tokenizer_config.json")
        special = {**_json_file(folder / "special_tokens_map.json"), **config}
        self.special = {
            name: value["content"] if isinstance(value, dict) else value
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if isinstance(value := special.get(name), (str, dict))
        }
        self._named_in = {name: folder / ("tokenizer_config.json" if name in config else "special_tokens_map.json")
                          for name in self.special}
        self._vocabulary = folder / "tokenizer.json"
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the runtime uses "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        self.chat_template = template

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_of(self, name: str) -> int | None:
        """The id of special token ``name`` (e.g. 'eos_token'), or None."""
        token = self.special.get(name)
        return None if token is None else self.backend.token_to_id(token)

    def token_of(self, token_id: int) -> str | None:
        """The token string of an id."""
        return self.backend.id_to_token(token_id)

    def missing(self, name: str) -> str | None:
        """When the settings name a special token ``name`` that the vocabulary lacks (transformers would add it as a
        new token, past the model's embeddings): the token, where it is named and the vocabulary; else None."""
        token = self.special.get(name)
        if token is None or self.backend.token_to_id(token) is not None:
            return None
        return f"{token!r} named in {self._named_in[name]} is not in the vocabulary ({self._vocabulary})"

    def encode(self, messages: Messages, chat_template: str | None) -> list[int]:
        """Token ids of one prompt, as ``rlhf_launch.runtime.data.encode_prompt`` makes them."""
        return self._encode(messages, chat_template, generation_prompt=True)

    def encode_conversation(self, messages: Messages, chat_template: str | None) -> list[int]:
        """Token ids of a whole conversation as the reward model reads it (``rlhf_launch.runtime.data.encode_conversation``)."""
        return self._encode(messages, chat_template, generation_prompt=False)

    def _encode(self, messages: Messages, chat_template: str | None, generation_prompt: bool) -> list[int]:
        from rlhf_launch.runtime.data import plain_chat, render_chat_template

        template = chat_template or self.chat_template
        if template is None:
            return self.backend.encode(plain_chat(messages, generation_prompt), add_special_tokens=True).ids
        text = render_chat_template(messages, template, generation_prompt, self.special)
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ids without special tokens, as the reward function receives it."""
        return self.backend.decode(ids, skip_special_tokens=True)


class HFTokenizer:
    """The runtime's own tokenizer (transformers, which imports torch), for folders without tokenizer.json."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.special = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}

    def __len__(self) -> int:
        return len(self.tok)

    def id_of(self, name: str) -> int | None:
        """The id of special token ``name`` (e.g. 'eos_token'), or None."""
        return getattr(self.tok, name + "_id")

    def token_of(self, token_id: int) -> str | None:
        """The token string of an id."""
        return self.tok.convert_ids_to_tokens(token_id)

    def missing(self, name: str) -> str | None:
        """None: transformers has already added a named token the vocabulary lacked (the vocab_size check sees it)."""
        return None

    def encode(self, messages: Messages, chat_template: str | None) -> list[int]:
        """Token ids of one prompt (``rlhf_launch.runtime.data.encode_prompt``)."""
        from rlhf_launch.runtime.data import encode_prompt

        return encode_prompt(self.tok, messages, chat_template)

    def encode_conversation(self, messages: Messages, chat_template: str | None) -> list[int]:
        """Token ids of a whole conversation as the reward model reads it (``rlhf_launch.runtime.data.encode_conversation``)."""
        from rlhf_launch.runtime.data import encode_conversation

        return encode_conversation(self.tok, messages, chat_template)

    def decode(self, ids: list[int]) -> str:
        """Text of ids without special tokens."""
        return self.tok.decode(ids, skip_special_tokens=True)


def _json_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt")


def has_own_code(folder: Path) -> bool:
    """Whether the tokenizer in ``folder`` is a class of its own code (an AutoTokenizer entry in tokenizer_config.json's
    auto_map), which only transformers can load as the runtime will."""
    auto_map = _json_file(folder / "tokenizer_config.json").get("auto_map")
    return isinstance(auto_map, list) or (isinstance(auto_map, dict) and "AutoTokenizer" in auto_map)


def tokenizer_files_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot hold a tokenizer (it has none of its files), or None."""
    if any((folder / name).is_file() for name in TOKENIZER_FILES) or any(folder.glob("*.tiktoken")) or any(folder.glob("*.model")):
        return None
    return (f"no tokenizer files ({' / '.join(TOKENIZER_FILES[:2])} / vocab.json ...) in {folder}; expected the folder of a "
            "Hugging Face tokenizer")


def load_preflight_tokenizer(pf: Preflight, key: str, folder: Path, settings, spec_key: str, fast: bool):
    """The tokenizer in ``folder`` as the pre-flight reads it: FastTokenizer when ``fast`` and it has a tokenizer.json
    (and is no class of its own code), else the runtime's, with ``settings`` (a TokenizerConfig at ``spec_key``); None
    (and a problem at ``key``, or at ``spec_key``.trust_remote_code for own code not allowed to run) when the folder
    has no tokenizer files or it cannot be loaded."""
    problem = tokenizer_files_problem(folder)
    if problem:
        pf.problems.append(error(key, f"{problem}; set {key} to the folder of the model's tokenizer"))
        return None
    try:
        if fast and (folder / "tokenizer.json").is_file() and not has_own_code(folder):
            return FastTokenizer(folder)
        from rlhf_launch.runtime.data import PromptDataError, load_tokenizer

        try:
            return HFTokenizer(load_tokenizer(settings, str(folder), spec_key))
        except PromptDataError as exc:
            refused = not settings.trust_remote_code and "trust_remote_code" in str(exc)
            pf.problems.append(error(f"{spec_key}.trust_remote_code" if refused else key, str(exc)))
    except Exception as exc:  # noqa: BLE001 - tokenizers and transformers raise many kinds for a bad file
        pf.problems.append(error(key, f"cannot load the tokenizer in {folder}: {one_line(exc, 300)}"))
    return None
