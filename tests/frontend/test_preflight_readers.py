"""The pre-flight's two tokenizer readers (rlhf_launch/frontend/preflight/readers.py) encode prompts and whole
conversations as the runtime does (rlhf_launch/runtime/data.py), with a chat template and with the plain
"Role: content" lines of ``plain_chat``, so that the checks never ask which reader they hold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rlhf_launch.core.config import TokenizerConfig
from rlhf_launch.frontend.preflight.readers import FastTokenizer, HFTokenizer
from rlhf_launch.runtime.data import encode_conversation, encode_prompt, load_tokenizer, plain_chat

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
CONVERSATION = [*PROMPT, {"role": "assistant", "content": "Hello there."}]
OTHER_TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"


@pytest.fixture
def plain_folder(tiny_models, tmp_path) -> Path:
    """The tiny actor's tokenizer without a chat template."""
    folder = tmp_path / "plain"
    shutil.copytree(tiny_models / "actor", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def test_plain_chat_is_one_role_line_per_message():
    assert plain_chat(PROMPT, generation_prompt=True) == "System: Be brief.\nUser: Hi\nAssistant:"
    assert plain_chat(CONVERSATION) == "System: Be brief.\nUser: Hi\nAssistant: Hello there."
    assert plain_chat([], generation_prompt=True) == "Assistant:"


@pytest.mark.parametrize("template", [None, OTHER_TEMPLATE])
@pytest.mark.parametrize("folder", ["templated", "plain"])
def test_both_readers_encode_as_the_runtime_does(tiny_models, plain_folder, folder, template):
    path = tiny_models / "actor" if folder == "templated" else plain_folder
    runtime = load_tokenizer(TokenizerConfig(), str(path))
    readers = [FastTokenizer(path), HFTokenizer(runtime)]
    prompt_ids = encode_prompt(runtime, PROMPT, template)
    conversation_ids = encode_conversation(runtime, CONVERSATION, template)
    for reader in readers:
        assert reader.encode(PROMPT, template) == prompt_ids
        assert reader.encode_conversation(CONVERSATION, template) == conversation_ids
    if folder == "plain" and template is None:
        assert readers[0].decode(conversation_ids) == plain_chat(CONVERSATION)


def test_a_special_token_the_vocabulary_lacks_is_named_with_where_it_is_named(tiny_models, tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(tiny_models / "actor", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<nope>"}))
    reader = FastTokenizer(folder)
    assert reader.missing("pad_token") == (f"'<nope>' named in {folder / 'tokenizer_config.json'} is not in the vocabulary "
                                           f"({folder / 'tokenizer.json'})")
    assert reader.missing("eos_token") is None
    assert HFTokenizer(load_tokenizer(TokenizerConfig(), str(tiny_models / "actor"))).missing("pad_token") is None
