"""The configuration of the ``tiny_remote`` model type: Llama's, under a name transformers does not know."""

from __future__ import annotations

from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    """Llama's configuration keys under the model type ``tiny_remote``."""

    model_type = "tiny_remote"
