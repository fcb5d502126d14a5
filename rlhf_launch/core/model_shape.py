"""How big a model is, without loading it: from a local config.json, else from its name.

The plan needs parameter counts and a few dimensions for its memory estimate; login nodes
have no torch and may have no network, so this reads at most one small JSON file."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

_SIZE_IN_NAME = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:[._]\d+)?)([bBmM])(?![A-Za-z])")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder that the memory estimate needs."""

    params: float  # count, not billions
    layers: int
    hidden: int
    kv_dim: int  # key/value heads x head dim: the KV cache per token and layer is 2 x kv_dim values
    vocab: int
    source: str  # where the numbers came from, shown in the plan
    heads: int | None = None  # attention heads; None: hidden / 128, the usual head size
    intermediate: int | None = None  # MLP width; None: 8/3 x hidden when gated (Llama's ratio), else 4 x hidden
    gated_mlp: bool = True  # Llama-type SwiGLU MLP (gate, up, down) with RMSNorm, as most decoders today; False: GPT's

    @property
    def attention_heads(self) -> int:
        """Attention heads: as configured, else one per 128 hidden units."""
        return self.heads or max(1, self.hidden // 128)

    @property
    def mlp_width(self) -> int:
        """The MLP's intermediate width: as configured, else the one the parameter count assumes."""
        return self.intermediate or (round(8 * self.hidden / 3) if self.gated_mlp else 4 * self.hidden)

    @staticmethod
    def from_params(params: float, source: str, vocab: int = 32000) -> ModelShape:
        """Dimensions of a typical dense decoder with this many parameters.

        With hidden = 128 x layers (the usual aspect ratio) and params ~ 12 x layers x hidden^2,
        layers = (params / (12 x 128^2))^(1/3): 7e9 gives 33 layers of width 4200 (LLaMA-2 7B: 32 x 4096).
        The MLP width is the widest of today's gated decoders, 3.5 x hidden (InternLM2, Mistral and Llama-3:
        14336 for 4096; LLaMA-2's is 2.7 x), since a guessed shape must not plan activations low.
        """
        layers = max(1, round((params / (12 * 128**2)) ** (1 / 3)))
        hidden = 128 * layers
        return ModelShape(params, layers, hidden, hidden, vocab, source, intermediate=round(3.5 * hidden))


# Vocabulary sizes of model families, for a model known only by its name: the logits of one token take 4 x vocab
# bytes in float32 several times over, and 32000 (LLaMA-2's) would under-count InternLM2's by 3x. Matched in order.
_FAMILY_VOCAB = (("internlm2", 92544), ("llama-3", 128256), ("llama3", 128256), ("qwen", 151936), ("smollm", 49152))
# Model types whose MLP is not gated (two matrices, GPT's 4 x hidden, LayerNorm): the activation count of GPT.
_PLAIN_MLP_TYPES = ("gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "mpt", "phi", "starcoder2", "codegen")


def vocab_from_name(name: str) -> int:
    """The vocabulary size of the model family ``name`` belongs to, else LLaMA-2's 32000."""
    lowered = name.lower()
    return next((vocab for family, vocab in _FAMILY_VOCAB if family in lowered), 32000)


def params_from_name(name: str) -> float | None:
    """'internlm2-chat-1_8b-sft' -> 1.8e9, 'SmolLM2-135M' -> 1.35e8; None when no size is named."""
    match = _SIZE_IN_NAME.search(Path(name).name) or _SIZE_IN_NAME.search(name)
    if not match:
        return None
    number = float(match.group(1).replace("_", "."))
    return number * (1e9 if match.group(2) in "bB" else 1e6)


def shape_from_config(cfg: dict, source: str) -> ModelShape:
    """Count parameters of a decoder from its Hugging Face config.json."""
    hidden = cfg["hidden_size"]
    layers = cfg["num_hidden_layers"]
    heads = cfg.get("num_attention_heads", max(1, hidden // 128))
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    inter = cfg.get("intermediate_size", 4 * hidden)
    vocab = cfg.get("vocab_size", 32000)
    gated = cfg.get("model_type") not in _PLAIN_MLP_TYPES
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = (3 if gated else 2) * hidden * inter
    embeddings = vocab * hidden * (1 if cfg.get("tie_word_embeddings", False) else 2)
    params = embeddings + layers * (attention + mlp + 2 * hidden) + hidden
    return ModelShape(float(params), layers, hidden, kv_heads * head_dim, vocab, source, heads, inter, gated)


def local_config(model_path: str | None) -> dict | None:
    """A local model folder's config.json (its text_config for multimodal models), or None."""
    config_file = Path(model_path).expanduser() / "config.json" if model_path else None
    if config_file is None or not config_file.is_file():
        return None
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("text_config", cfg) if isinstance(cfg, dict) else None


def model_shape(model_path: str | None, num_params_b: float | None) -> ModelShape | None:
    """The best available description of a model, or None when nothing is known."""
    if model_path:
        cfg = local_config(model_path)
        if cfg is not None:
            try:
                shape = shape_from_config(cfg, "config.json")
            except (ValueError, KeyError, TypeError):
                shape = None
            if shape is not None:
                if num_params_b:
                    return dataclasses.replace(shape, params=num_params_b * 1e9, source="num_params_b")
                return shape
    vocab = vocab_from_name(model_path or "")
    if num_params_b:
        return ModelShape.from_params(num_params_b * 1e9, "num_params_b", vocab)
    params = params_from_name(model_path or "")
    if params and math.isfinite(params):
        return ModelShape.from_params(params, "name", vocab)
    return None
