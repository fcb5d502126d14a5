"""The per-model tokenizers (``model_configs.<role>.tokenizer_config``): each loads, its token ids are in its
vocabulary, and its model's vocabulary holds it; a reward model's renders a sample conversation with each source's
reward system prompt; a critic's or reference's that differs from the policy's is warned about (they read the
policy's ids). Roles the plan does not have are skipped."""

from __future__ import annotations

from rlhf_launch.core.data_sources import parse_source
from rlhf_launch.core.plan import planned_models
from rlhf_launch.core.problems import error, warning
from rlhf_launch.frontend.preflight.findings import SAMPLE_PROMPT, Preflight
from rlhf_launch.frontend.preflight.models import model_folder
from rlhf_launch.frontend.preflight.prompts import render_sample
from rlhf_launch.frontend.preflight.readers import load_preflight_tokenizer
from rlhf_launch.frontend.preflight.tokenizer import missing_special_tokens


def check_model_tokenizers(pf: Preflight, policy_tokenizer) -> None:
    """Each ``model_configs.<role>.tokenizer_config``: the tokenizer loads, its token ids are inside it, its
    model's vocabulary holds it; a reward model's renders a sample conversation with its system prompt;
    a critic's or reference's that differs from the policy's is warned about (they read the policy's ids).
    Roles the plan does not have are skipped."""
    for role, model in planned_models(pf.spec).items():
        if model.tokenizer_config is None or (role == "reward" and model.reward_function):
            continue
        key = f"model_configs.{role}.tokenizer_config"
        pf.at(key, model.tokenizer_config.tokenizer_path or model.model_path)
        tokenizer = _model_tokenizer(pf, role, key)
        if tokenizer is None or not _token_ids_fit(pf, role, key, tokenizer):
            continue
        if role == "reward":
            _render_reward_samples(pf, key, tokenizer)
        elif role in ("critic", "reference") and policy_tokenizer is not None and not _same_shape(tokenizer, policy_tokenizer):
            pf.problems.append(warning(key, (
                f"loads a tokenizer of {len(tokenizer)} tokens (pad {tokenizer.id_of('pad_token')}), but the {role} reads the "
                f"policy's token ids ({len(policy_tokenizer)} tokens, pad {policy_tokenizer.id_of('pad_token')}): its model must "
                "share the policy's vocabulary; remove this tokenizer_config or make it the policy's"
            )))


def _model_tokenizer(pf: Preflight, role: str, key: str):
    """The role's own tokenizer, loaded as ``check_tokenizer`` loads the job's; None (and a problem) when it cannot be."""
    from rlhf_launch.core.model_tokenizers import tokenizer_config_of

    config = tokenizer_config_of(pf.spec, role)
    model_path = pf.spec.model_configs.roles()[role].model_path
    if config.tokenizer_path == model_path:
        folder = pf.folders.get(role)
    else:
        folder = model_folder(pf, f"{key}.tokenizer_path", config.tokenizer_path)
    if folder is None:
        return None
    return load_preflight_tokenizer(pf, f"{key}.tokenizer_path", folder, config, key, fast=not config.from_pretrained_kwargs)


def _token_ids_fit(pf: Preflight, role: str, key: str, tokenizer) -> bool:
    """The settings' token ids are in the tokenizer, it has a padding token, and the role's model embeds every id."""
    config = pf.spec.model_configs.roles()[role].tokenizer_config
    size = len(tokenizer)
    fits = True
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(config, name)
        if token_id is not None and not 0 <= token_id < size:
            pf.problems.append(error(f"{key}.{name}", f"found {token_id}, outside this tokenizer's vocabulary (ids 0..{size - 1})"))
            fits = False
    if fits and missing_special_tokens(pf, key, tokenizer, config):
        fits = False
    if fits and config.pad_token_id is None and tokenizer.id_of("pad_token") is None:
        eos = tokenizer.id_of("eos_token")
        hint = f" (e.g. the eos id {eos})" if eos is not None else ""
        pf.problems.append(error(f"{key}.pad_token_id", f"the {role}'s tokenizer has no padding token; set it{hint}"))
        fits = False
    vocab = pf.configs.get(role, {}).get("vocab_size")
    if isinstance(vocab, int) and vocab < size:
        pf.problems.append(error(key, (
            f"{pf.folders[role]} has vocab_size {vocab}, but this tokenizer has {size} tokens: ids from {vocab} on have no "
            "embedding; expected the tokenizer of this model (tokenizer_path defaults to the model's own folder)"
        )))
        fits = False
    if fits:
        pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.id_of("pad_token")
        pf.notes.append(f"{role} tokenizer: {size} tokens, pad {pad}")
    return fits


def _render_reward_samples(pf: Preflight, key: str, tokenizer) -> None:
    """A sample conversation renders through the reward tokenizer with each source's reward system prompt."""
    from rlhf_launch.core.system_prompts import system_prompt_table, with_system_prompt

    table = system_prompt_table(pf.spec.dataset_config.system_prompts)
    sample = pf.prompts[0] if pf.prompts else SAMPLE_PROMPT
    chat_template = pf.spec.model_configs.reward.tokenizer_config.chat_template
    seen = set()
    for entry in pf.spec.dataset_config.ppo_datas:
        source = parse_source(entry)
        name = source.reward_meta or source.meta
        if name in seen or (name is not None and name not in table):
            continue
        seen.add(name)
        messages = with_system_prompt(sample, table[name] if name else None)
        what = f"[{'REWARD_META' if source.reward_meta else 'META'}]:{name}" if name else "without a system prompt"
        render_sample(pf, key, what, tokenizer, messages, True, chat_template)


def _same_shape(a, b) -> bool:
    """Whether two pre-flight tokenizers have the same size and special token ids."""
    return len(a) == len(b) and all(a.id_of(name) == b.id_of(name) for name in ("pad_token", "eos_token", "bos_token"))
