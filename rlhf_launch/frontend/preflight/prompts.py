"""The prompts and their system prompts, through the job's tokenizer: the sampled prompts render through the chat
template and those longer than max_seq_len are counted; a sample prompt renders with each source's [META] system
prompt, and, when the reward model reads the policy's tokens, a sample conversation with its [REWARD_META] one (a
template may refuse system messages).

A rendered prompt is encoded as it is, without the special tokens the tokenizer adds to plain text: a tokenizer
that adds a BOS token (Llama-2's post-processor puts <s> first) gets none unless the template renders
``{{ bos_token }}``, and every role then reads its prompts without it. That is warned about (``check_bos``)."""

from __future__ import annotations

from rlhf_launch.core.data_sources import parse_source
from rlhf_launch.core.problems import error, warning
from rlhf_launch.frontend.preflight.findings import SAMPLE_PROMPT, SAMPLE_RESPONSES, Messages, Preflight


def check_prompts(pf: Preflight, tokenizer) -> None:
    """The sampled prompts render through the chat template, starting with the BOS token when the tokenizer adds one
    (``check_bos``); those over max_seq_len are counted."""
    chat_template = pf.spec.tokenizer_config.chat_template
    check_bos(pf, "tokenizer_config", tokenizer, chat_template)
    if not pf.prompts:
        return
    limit = pf.spec.dataset_config.max_seq_len
    pf.at("dataset_config.ppo_datas", f"the {len(pf.prompts)} sampled prompts")
    lengths = []
    for messages in pf.prompts:
        try:
            lengths.append(len(tokenizer.encode(messages, chat_template)))
        except Exception as exc:  # noqa: BLE001 - a chat template can raise anything
            key = "tokenizer_config.chat_template" if chat_template else "tokenizer_config.tokenizer_path"
            pf.problems.append(error(key, f"the chat template fails on the prompt {messages!r}: {type(exc).__name__}: {exc}"))
            return
    over = [n for n in lengths if n > limit]
    if over:
        pf.problems.append(warning("dataset_config.max_seq_len", (
            f"{len(over)} of {len(lengths)} prompts checked are longer than {limit} tokens (the longest {max(over)}): "
            f"they keep only their last {limit} tokens, so their beginning is cut off"
        )))
    pf.notes.append(f"{len(lengths)} prompts rendered: {min(lengths)}..{max(lengths)} tokens, {len(over)} over max_seq_len {limit}")


def check_system_prompts(pf: Preflight, tokenizer) -> None:
    """A sample prompt renders with each source's [META] system prompt through the policy's chat template
    (a template may refuse system messages), and, when the reward model reads the policy's tokens, a
    sample conversation with its [REWARD_META] one."""
    from rlhf_launch.core.system_prompts import system_prompt_table, with_system_prompt

    table = system_prompt_table(pf.spec.dataset_config.system_prompts)
    sample = pf.prompts[0] if pf.prompts else SAMPLE_PROMPT
    reward_own = pf.spec.model_configs.reward.tokenizer_config is not None  # check_model_tokenizers renders those
    for i, entry in enumerate(pf.spec.dataset_config.ppo_datas):
        source = parse_source(entry)
        wanted = [("META", source.meta, False)]
        if not reward_own and not pf.spec.model_configs.reward.reward_function:
            wanted.append(("REWARD_META", source.reward_meta, True))
        for tag, name, answered in wanted:
            if name is None or name not in table:
                continue  # unknown names are spec errors, reported before the pre-flight
            pf.at(f"dataset_config.ppo_datas.{i}", f"[{tag}]:{name}")
            messages = with_system_prompt(sample, table[name])
            render_sample(pf, f"dataset_config.ppo_datas.{i}", f"[{tag}]:{name}", tokenizer, messages, answered,
                          pf.spec.tokenizer_config.chat_template)


def render_sample(pf: Preflight, key: str, what: str, tokenizer, messages: Messages, answered: bool, chat_template: str | None) -> None:
    """Render ``messages`` (with a sample answer when ``answered``) and note its length, or report the template's failure."""
    if answered:
        messages = [*messages, {"role": "assistant", "content": SAMPLE_RESPONSES[1]}]
    try:
        ids = tokenizer.encode_conversation(messages, chat_template) if answered else tokenizer.encode(messages, chat_template)
    except Exception as exc:  # noqa: BLE001 - a chat template can raise anything
        pf.problems.append(error(key, (
            f"{what}: the chat template fails on {messages!r:.200}: {type(exc).__name__}: {exc}; expected a template that "
            "accepts a leading system message (set a chat_template that does, or drop the system prompt)"
        )))
        return
    pf.notes.append(f"{key} {what}: a sample {'conversation' if answered else 'prompt'} renders to {len(ids)} tokens")
    if key.startswith("model_configs.") and key.endswith(".tokenizer_config"):  # a model's own tokenizer (the reward's)
        check_bos(pf, key, tokenizer, chat_template)


def added_bos(tokenizer) -> int | None:
    """The id of the BOS token that ``tokenizer`` (a pre-flight reader) puts before a text it encodes with its special
    tokens, as the runtime's transformers tokenizer does: tokenizer.json's post-processor, or for a folder without one
    its add_bos_token setting; None when it adds none."""
    bos = tokenizer.id_of("bos_token")
    if bos is None:
        return None
    if hasattr(tokenizer, "backend"):  # FastTokenizer: the post-processor of tokenizer.json decides, as in transformers
        ids = tokenizer.backend.encode("a", add_special_tokens=True).ids
    else:  # HFTokenizer: ask the runtime's own tokenizer
        ids = tokenizer.tok("a")["input_ids"]
    return bos if ids[:1] == [bos] else None


def check_bos(pf: Preflight, settings_key: str, tokenizer, chat_template: str | None) -> None:
    """Warn (once per ``settings_key``, the tokenizer settings' key) when ``tokenizer`` adds a BOS token to the texts it
    encodes but a sample prompt rendered through the chat template (``chat_template``, else the tokenizer's own) starts
    without it: prompts are encoded as rendered, so every role would read them without their BOS."""
    key = f"{settings_key}.chat_template"
    bos = added_bos(tokenizer)
    if bos is None or any(p.path == key for p in pf.problems):
        return
    sample = pf.prompts[0] if pf.prompts else SAMPLE_PROMPT
    try:
        ids = tokenizer.encode(sample, chat_template)
    except Exception:  # noqa: BLE001 - a failing template is reported by the checks that render the prompts
        return
    # Without any chat template the runtime encodes its "Role: content" lines with the special tokens, BOS included.
    if ids[:1] == [bos]:
        return
    if chat_template is not None:
        which, fix = "this chat template", "start it with '{{ bos_token }}'"
    else:
        which, fix = "the tokenizer's own chat template", f"set {key} to that template with '{{{{ bos_token }}}}' first"
    pf.problems.append(warning(key, (
        f"the tokenizer adds the BOS token {tokenizer.token_of(bos)!r} (id {bos}) before the texts it encodes, but prompts "
        f"rendered through {which} start without it (they are encoded as rendered), so every role reads them without it; {fix}"
    )))
