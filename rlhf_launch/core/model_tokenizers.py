"""Which tokenizer each model reads: ``model_configs.<role>.tokenizer_config``, else the job's
``tokenizer_config`` (as XTuner does).

The policy's tokenizer (the actor's) renders the prompts and decodes the responses; the reference
and the critic read the policy's token ids. A reward model whose tokenizer differs from the policy's
scores the conversation re-rendered with its own (rlhf_launch/runtime/roles/reward.py).

Pure Python: the launcher's checks use it without importing transformers.
"""

from __future__ import annotations

import dataclasses
import os

from rlhf_launch.core.config import JobSpec, TokenizerConfig

# from_pretrained keywords the runtime sets itself, and the key that says the same thing instead.
RESERVED_KWARGS = {
    "padding_side": "prompts are always left-padded (tokenizer_config.padding_side)",
    "local_files_only": "runs never download: tokenizers are always read from local files",
    "pretrained_model_name_or_path": "give the tokenizer in tokenizer_config.tokenizer_path",
    "chat_template": "use tokenizer_config.chat_template",
    "trust_remote_code": "use tokenizer_config.trust_remote_code",
}


def tokenizer_config_of(spec: JobSpec, role: str) -> TokenizerConfig:
    """The tokenizer settings of ``role``'s model, with ``tokenizer_path`` filled in: the model's own
    ``tokenizer_config`` (path default: its model_path), else the job's (path default: the actor's)."""
    model = spec.model_configs.roles()[role]
    if model.tokenizer_config is None:
        config, default_path = spec.tokenizer_config, spec.model_configs.actor.model_path
    else:
        config, default_path = model.tokenizer_config, model.model_path
    return dataclasses.replace(config, tokenizer_path=config.tokenizer_path or default_path)


def policy_tokenizer_config(spec: JobSpec) -> TokenizerConfig:
    """The tokenizer settings of the policy: the actor's ``tokenizer_config``, else the job's."""
    return tokenizer_config_of(spec, "actor")


def same_settings(a: TokenizerConfig, b: TokenizerConfig) -> bool:
    """Whether two tokenizer settings load the same tokenizer: the same folder and the same overrides."""
    return _normalised(a) == _normalised(b)


def _normalised(config: TokenizerConfig) -> TokenizerConfig:
    path = config.tokenizer_path
    if path is not None and (path.startswith(("/", "~", ".")) or os.path.exists(path)):
        path = os.path.realpath(os.path.expanduser(path))
    return dataclasses.replace(config, tokenizer_path=path)


def tokenizer_key(spec: JobSpec, role: str) -> str:
    """Where ``role``'s tokenizer settings are in the spec, for messages."""
    if spec.model_configs.roles()[role].tokenizer_config is None:
        return "tokenizer_config"
    return f"model_configs.{role}.tokenizer_config"
