"""The job's tokenizer (``tokenizer_config``): it loads offline; the token ids of the settings are inside it; its
special tokens exist, with a padding token and a stop token; every model's vocabulary holds its ids."""

from __future__ import annotations

from pathlib import Path

from rlhf_launch.core.problems import error, warning
from rlhf_launch.frontend.preflight.findings import Preflight
from rlhf_launch.frontend.preflight.models import model_folder
from rlhf_launch.frontend.preflight.readers import load_preflight_tokenizer


def missing_special_tokens(pf: Preflight, key: str, tokenizer, settings) -> bool:
    """Report each special token (pad, bos, eos) that the tokenizer's settings name but its vocabulary lacks, unless
    ``settings`` (a TokenizerConfig) gives its id; True when any is."""
    found = False
    for short, what in (("pad", "padding"), ("bos", "beginning-of-sequence"), ("eos", "end-of-sequence")):
        missing = tokenizer.missing(f"{short}_token")
        if missing is None or getattr(settings, f"{short}_token_id") is not None:
            continue
        hint = ""
        if short == "pad" and (eos := tokenizer.id_of("eos_token")) is not None:
            hint = f" (e.g. the eos id {eos})"
        pf.problems.append(error(f"{key}.{short}_token_id", (
            f"the {short}_token {missing}: the runtime would add it as a new token, which the model has no embedding for; "
            f"expected a token of the vocabulary: name one there, or set {key}.{short}_token_id to the {what} token's id{hint}"
        )))
        found = True
    return found


def check_tokenizer(pf: Preflight):
    """The tokenizer loads offline; its special tokens exist, within every model's vocabulary."""
    tc = pf.spec.tokenizer_config
    key = "tokenizer_config.tokenizer_path"
    path = tc.tokenizer_path or pf.spec.model_configs.actor.model_path
    if path is None:
        return None
    pf.at(key, path)
    folder = pf.folders.get("actor") if path == pf.spec.model_configs.actor.model_path else model_folder(pf, key, path)
    if folder is None:
        return None
    tokenizer = load_preflight_tokenizer(pf, key, folder, tc, "tokenizer_config", fast=True)
    if tokenizer is None or _ids_outside(pf, len(tokenizer)):
        return None
    missing = missing_special_tokens(pf, "tokenizer_config", tokenizer, tc)
    pad, stop = _pad_and_stop(pf, folder, tokenizer, missing)
    answer_end = pf.spec.repeater_config.answer_end_id
    if answer_end is not None and pad is not None and answer_end == pad and answer_end != stop:
        pf.problems.append(warning(
            "repeater_config.answer_end_id", f"{answer_end} is also the padding token: every padded response would "
            "look stopped; expected a token distinct from pad_token_id",
        ))
    too_small = _vocabularies_too_small(pf, len(tokenizer))
    if missing or pad is None or too_small:
        return None
    also = f" and {answer_end}" if answer_end is not None else ""
    pf.notes.append(f"tokenizer {folder}: {len(tokenizer)} tokens, pad {pad}, stop {stop}{also}")
    return tokenizer


def _ids_outside(pf: Preflight, size: int) -> bool:
    """Report each token id of the settings outside the tokenizer's ids; True when any is."""
    tc, gk = pf.spec.tokenizer_config, pf.spec.rollout_config.generate_kwargs
    ids = {
        "tokenizer_config.pad_token_id": tc.pad_token_id, "tokenizer_config.eos_token_id": tc.eos_token_id,
        "tokenizer_config.bos_token_id": tc.bos_token_id,
        "rollout_config.generate_kwargs.pad_token_id": gk.pad_token_id,
        "rollout_config.generate_kwargs.eos_token_id": gk.eos_token_id,
        "repeater_config.answer_end_id": pf.spec.repeater_config.answer_end_id,
    }
    bad = False
    for name, token_id in ids.items():
        if token_id is not None and not 0 <= token_id < size:
            pf.problems.append(error(name, f"found {token_id}, outside the tokenizer's vocabulary (ids 0..{size - 1})"))
            bad = True
    return bad


def _pad_and_stop(pf: Preflight, folder: Path, tokenizer, missing: bool) -> tuple[int | None, int | None]:
    """The padding and stop ids the run will use; a tokenizer without a padding token is an error, one without an
    end-of-sequence token a warning (unless ``missing`` tokens were reported already)."""
    tc, gk = pf.spec.tokenizer_config, pf.spec.rollout_config.generate_kwargs
    pad = tc.pad_token_id if tc.pad_token_id is not None else tokenizer.id_of("pad_token")
    eos = tc.eos_token_id if tc.eos_token_id is not None else tokenizer.id_of("eos_token")
    if pad is None and not (missing and tokenizer.missing("pad_token")):
        hint = f" (e.g. the eos id {eos})" if eos is not None else ""
        pf.problems.append(error("tokenizer_config.pad_token_id", f"the tokenizer in {folder} has no padding token; set it{hint}"))
    stop = gk.eos_token_id if gk.eos_token_id is not None else eos
    if stop is None and not (missing and tokenizer.missing("eos_token")):
        pf.problems.append(warning(
            "tokenizer_config.eos_token_id", f"the tokenizer in {folder} has no end-of-sequence token, so responses "
            f"stop only at max_new_tokens; expected one (set tokenizer_config.eos_token_id)",
        ))
    return pad, stop


def _vocabularies_too_small(pf: Preflight, size: int) -> bool:
    """Report each model whose vocab_size cannot embed the tokenizer's ids; True when any."""
    bad = False
    for role, cfg in pf.configs.items():
        vocab = cfg.get("vocab_size")
        if role == "reward" and pf.spec.model_configs.reward.tokenizer_config is not None:
            continue  # checked against its own tokenizer (check_model_tokenizers)
        if isinstance(vocab, int) and vocab < size:
            pf.problems.append(error(
                f"model_configs.{role}.model_path", f"{pf.folders[role]} has vocab_size {vocab}, but the tokenizer has "
                f"{size} tokens: ids from {vocab} on have no embedding; expected a tokenizer of this model",
            ))
            bad = True
    return bad
