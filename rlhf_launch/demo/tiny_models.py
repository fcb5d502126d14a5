"""Build tiny, offline, deterministic models for tests and smoke runs.

    python -m rlhf_launch.demo.tiny_models [--out DIR] [--force]

DIR (default ``build/tiny`` in the repository) receives:

- ``actor/``:  a random ``LlamaForCausalLM`` (2 layers, hidden 64, head_dim 32) + tokenizer;
- ``critic/``: a random ``LlamaForSequenceClassification`` (one output) + tokenizer;
- ``reward/``: the same classifier trained for a few seconds to predict ``rlhf_launch.runtime.rewards.vowel_ratio``
  of the response, with ``training_report.json`` (held-out Pearson correlation);
- ``.complete``: a stamp holding the hash of the recipe, written last. A rerun with the same recipe
  does nothing; ``--force`` rebuilds.

The tokenizer is a byte-level BPE (vocab 512) trained on the project's prompt corpus
(``data/prompts/tiny_prompts.jsonl``) and generated text. Everything is seeded; the build runs on one
thread so that the trained reward model is reproducible too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from rlhf_launch.demo.staged_dir import build_once, command_line
from rlhf_launch.runtime.rewards import vowel_score

RECIPE_VERSION = "tiny-models-1"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT_DIR = REPO_ROOT / "build" / "tiny"
PROMPTS_FILE = REPO_ROOT / "data" / "prompts" / "tiny_prompts.jsonl"

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ["<|user|>", "<|assistant|>", "<|system|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS]  # ids 0, 1, 2, ... in this order

# Each turn is "<|role|>content\n"; assistant turns end with eos so a trained actor learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

TOKENIZER_SETTINGS = {"vocab_size": 512, "generated_lines": 2000, "seed": 11}

MODEL_SETTINGS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 32,  # vLLM's CPU attention needs head_dim >= 32
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
MODEL_SEEDS = {"actor": 1, "critic": 2, "reward": 3}

REWARD_TRAINING = {
    "seed": 5,
    "steps": 300,
    "batch_size": 32,
    "learning_rate": 3e-3,
    "max_response_tokens": 48,
    "heldout_examples": 512,
    "heldout_seed": 6,
    "min_correlation": 0.8,
}


def recipe() -> dict:
    """Everything that determines the build; its hash is the stamp."""
    return {
        "version": RECIPE_VERSION,
        "special_tokens": SPECIAL_TOKENS,
        "chat_template": CHAT_TEMPLATE,
        "tokenizer": TOKENIZER_SETTINGS,
        "model": MODEL_SETTINGS,
        "model_seeds": MODEL_SEEDS,
        "reward_training": REWARD_TRAINING,
        "prompts_sha256": hashlib.sha256(PROMPTS_FILE.read_bytes()).hexdigest(),
    }


def recipe_hash() -> str:
    """SHA-256 of the recipe, as hex: the build's stamp."""
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- data


def load_prompt_messages(path: Path = PROMPTS_FILE) -> list[list[dict]]:
    """The chat messages of each prompt in a JSON-lines file of ``{"messages": [...]}`` records."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f if line.strip()]


# Words at both ends of the vowel spectrum, so BPE learns vowel-rich and vowel-poor merges that the
# reward-model data can then draw on.
_WORD_POOLS = (
    (
        "the a and of to in is it you that was for on are with as he they be at one have this from "
        "or had by word but what some we can out other were all there when up use your how said an "
        "each she which do their time if will way about many then them write would like so these her"
    ),
    "aeiou eau oui aioli aia ooo eee iou ouai aue eia",
    "rhythm strength shh psst brr nth crwth tsk hmm grr pfft kvtch",
)


def generated_text(rng: random.Random, lines: int) -> list[str]:
    """``lines`` random sentences from the word pools (common, vowel-rich, vowel-poor words)."""
    pools = [pool.split() for pool in _WORD_POOLS]
    text = []
    for _ in range(lines):
        pool = rng.choice(pools)
        words = [rng.choice(pool) for _ in range(rng.randint(3, 12))]
        text.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
    return text


# ----------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(prompt_messages: list[list[dict]]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (special tokens first, chat template, left padding) trained on the
    prompts' texts and generated sentences."""
    rng = random.Random(TOKENIZER_SETTINGS["seed"])
    corpus = [m["content"] for messages in prompt_messages for m in messages]
    corpus += generated_text(rng, TOKENIZER_SETTINGS["generated_lines"])

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_SETTINGS["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=ROLE_TOKENS,
        padding_side="left",  # generation appends on the right
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # keeps decode(encode(text)) == text
        model_max_length=MODEL_SETTINGS["max_position_embeddings"],
    )


# -------------------------------------------------------------------------------------------- models


def llama_config(tokenizer: PreTrainedTokenizerFast, **extra) -> LlamaConfig:
    """The tiny Llama config for ``tokenizer``'s vocabulary and special tokens; ``extra`` adds keys such as num_labels."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,  # sequence classifiers find the last token with it
        **MODEL_SETTINGS,
        **extra,
    )


def init_model(model_class: type[PreTrainedModel], config: LlamaConfig, seed: int) -> PreTrainedModel:
    """A freshly initialised float32 ``model_class`` from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return model_class(config).to(torch.float32).eval()


def save_with_tokenizer(model: PreTrainedModel, tokenizer, directory: Path) -> None:
    """Save the model (safetensors) and the tokenizer into ``directory``."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


# ------------------------------------------------------------------------------------- reward model


@dataclass
class RewardExample:
    """One reward-model training example: prompt and response token ids, the decoded response and its score."""

    input_ids: list[int]  # rendered prompt + response tokens (+ eos sometimes)
    response: str
    score: float


def _response_token_pools(tokenizer) -> dict[str, list[int]]:
    """Ordinary (non-special) tokens, and those whose letters are mostly vowels / mostly consonants."""
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    rich, poor = [], []
    for token_id in ordinary:
        text = tokenizer.decode([token_id])
        if not any(c.isalpha() for c in text):
            continue
        score = vowel_score(text)
        if score >= 0.0:  # at least half of the letters are vowels
            rich.append(token_id)
        elif score <= -0.5:  # at most a quarter
            poor.append(token_id)
    return {"ordinary": ordinary, "rich": rich, "poor": poor}


def _sample_response_ids(rng: random.Random, pools: dict[str, list[int]], max_tokens: int) -> list[int]:
    length = rng.randint(1, max_tokens)
    if rng.random() < 0.25:  # uniform noise: odd bytes, punctuation, letter-free responses
        return [rng.choice(pools["ordinary"]) for _ in range(length)]
    vowel_bias = rng.random()  # spreads the scores over the whole [-1, 1] range
    ids = []
    for _ in range(length):
        if rng.random() < 0.1:
            ids.append(rng.choice(pools["ordinary"]))
        else:
            ids.append(rng.choice(pools["rich"] if rng.random() < vowel_bias else pools["poor"]))
    return ids


def render_prompts(tokenizer, prompt_messages: list[list[dict]]) -> list[list[int]]:
    """Token ids of each prompt rendered with the chat template, up to the assistant tag that starts a response."""
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompt_messages]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def sample_reward_examples(
    tokenizer, prompt_messages: list[list[dict]], count: int, seed: int, max_response_tokens: int = 48
) -> list[RewardExample]:
    """(chat prompt, random-ish response) pairs scored with ``vowel_score`` of the decoded response.

    The input is prompt ids followed by response ids, as a PPO rollout hands them to a reward model;
    half of the responses end with eos, like finished generations.
    """
    rng = random.Random(seed)
    pools = _response_token_pools(tokenizer)
    prompts = render_prompts(tokenizer, prompt_messages)
    examples = []
    for _ in range(count):
        response_ids = _sample_response_ids(rng, pools, max_response_tokens)
        response = tokenizer.decode(response_ids, skip_special_tokens=True)
        ending = [tokenizer.eos_token_id] if rng.random() < 0.5 else []
        input_ids = rng.choice(prompts) + response_ids + ending
        examples.append(RewardExample(input_ids, response, vowel_score(response)))
    return examples


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequences`` as left-padded input_ids and attention_mask, both [B, T] with T the longest length."""
    width = max(len(s) for s in sequences)
    input_ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences])
    attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return input_ids, attention_mask


@torch.no_grad()
def predict_rewards(model, sequences: list[list[int]], pad_id: int, batch_size: int = 64) -> list[float]:
    """Scores from the model's own forward, which reads the rightmost non-pad token."""
    model.eval()
    scores = []
    for start in range(0, len(sequences), batch_size):
        input_ids, attention_mask = left_pad(sequences[start : start + batch_size], pad_id)
        scores += model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].tolist()
    return scores


def pearson(xs: list[float], ys: list[float]) -> float:
    """The Pearson correlation of two equally long lists."""
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def train_reward_model(model, tokenizer, prompt_messages: list[list[dict]]) -> dict:
    """Regress vowel_score with MSE through the model's own forward, so training reads the score at
    the same (rightmost non-pad) position as AutoModelForSequenceClassification at inference."""
    settings = REWARD_TRAINING
    steps, batch_size = settings["steps"], settings["batch_size"]
    examples = sample_reward_examples(
        tokenizer, prompt_messages, steps * batch_size, settings["seed"], settings["max_response_tokens"]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    model.train()
    for step in range(steps):
        batch = examples[step * batch_size : (step + 1) * batch_size]
        input_ids, attention_mask = left_pad([e.input_ids for e in batch], tokenizer.pad_token_id)
        predicted = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        loss = torch.nn.functional.mse_loss(predicted, torch.tensor([e.score for e in batch]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()

    heldout = sample_reward_examples(
        tokenizer, prompt_messages, settings["heldout_examples"], settings["heldout_seed"],
        settings["max_response_tokens"],
    )
    predicted = predict_rewards(model, [e.input_ids for e in heldout], tokenizer.pad_token_id)
    targets = [e.score for e in heldout]
    return {
        "target": "rlhf_launch.runtime.rewards:vowel_ratio",
        "steps": steps,
        "batch_size": batch_size,
        "final_train_loss": round(loss.item(), 5),
        "heldout_examples": len(heldout),
        "heldout_pearson": round(pearson(predicted, targets), 4),
    }


# --------------------------------------------------------------------------------------------- build


def _progress(message: str, started: float) -> None:
    print(f"[tiny_models] {message} ({time.perf_counter() - started:.1f}s)", flush=True)


def _build_into(directory: Path) -> None:
    started = time.perf_counter()
    prompt_messages = load_prompt_messages()
    tokenizer = train_tokenizer(prompt_messages)
    _progress(f"tokenizer: vocab {len(tokenizer)}, trained on {len(prompt_messages)} prompts", started)

    config = llama_config(tokenizer)
    actor = init_model(LlamaForCausalLM, config, MODEL_SEEDS["actor"])
    save_with_tokenizer(actor, tokenizer, directory / "actor")
    _progress(f"actor: {sum(p.numel() for p in actor.parameters()):,} parameters", started)

    classifier_config = llama_config(tokenizer, num_labels=1)
    critic = init_model(LlamaForSequenceClassification, classifier_config, MODEL_SEEDS["critic"])
    save_with_tokenizer(critic, tokenizer, directory / "critic")
    _progress("critic: random value head", started)

    reward = init_model(LlamaForSequenceClassification, classifier_config, MODEL_SEEDS["reward"])
    report = train_reward_model(reward, tokenizer, prompt_messages)
    if report["heldout_pearson"] < REWARD_TRAINING["min_correlation"]:
        raise RuntimeError(f"reward model too weak: {report}")
    save_with_tokenizer(reward, tokenizer, directory / "reward")
    (directory / "reward" / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    _progress(f"reward: held-out Pearson with vowel_ratio {report['heldout_pearson']:.3f}", started)


@contextlib.contextmanager
def _single_thread_without_progress_bars():
    """One thread makes the reward training reproducible (and is polite on small machines);
    transformers' per-file progress bars would drown the build's own progress lines."""
    threads = torch.get_num_threads()
    bars = hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


def build(out_dir: Path = DEFAULT_OUT_DIR, force: bool = False) -> Path:
    """Build the tiny models into ``out_dir`` unless its stamp already matches the recipe."""

    def build_into(staging: Path) -> None:
        with _single_thread_without_progress_bars():
            _build_into(staging)

    return build_once(out_dir, recipe_hash(), build_into, "tiny_models", force)


def main(argv: list[str] | None = None) -> int:
    """The command line: ``--out DIR`` and ``--force``; returns the exit status."""
    return command_line(build, DEFAULT_OUT_DIR, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
