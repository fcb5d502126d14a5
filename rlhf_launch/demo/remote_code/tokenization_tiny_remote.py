"""The ``tiny_remote`` tokenizer: the tiny models' byte-level BPE under a class name transformers does not know."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast


class TinyRemoteTokenizer(PreTrainedTokenizerFast):
    """A tokenizer.json tokenizer of its own class, loaded through tokenizer_config.json's auto_map."""
