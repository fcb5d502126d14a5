import json
import os
import statistics
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may come from the hub

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from rlhf_launch.demo import tiny_models
from rlhf_launch.demo.staged_dir import STAMP_NAME
from rlhf_launch.runtime.rewards import vowel_ratio

HELDOUT_SEED = 2024  # differs from every seed the build uses


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return tiny_models.build(tmp_path_factory.mktemp("tiny") / "models")


@pytest.fixture(scope="module")
def tokenizer(built):
    return AutoTokenizer.from_pretrained(built / "actor")


def fake_build(directory: Path) -> None:
    (directory / "marker").write_text("built")


# ------------------------------------------------------------------------------------------ layout


def test_build_writes_three_models_a_stamp_and_nothing_else(built):
    for name in ("actor", "critic", "reward"):
        for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (built / name / file).is_file(), f"{name}/{file}"
    assert (built / STAMP_NAME).read_text().strip() == tiny_models.recipe_hash()
    assert sorted(p.name for p in built.parent.iterdir()) == [built.name]  # no staging leftovers


def test_weights_are_float32(built):
    for name in ("actor", "critic", "reward"):
        weights = load_file(built / name / "model.safetensors")
        assert {t.dtype for t in weights.values()} == {torch.float32}


def test_training_report_records_the_correlation(built):
    report = json.loads((built / "reward" / "training_report.json").read_text())
    assert report["target"] == "rlhf_launch.runtime.rewards:vowel_ratio"
    assert report["heldout_pearson"] > 0.8


# --------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "text",
    ["Tell me a short fact about the ocean.", "  two  spaces\nand a newline\t", "héllo wörld — ✓ 🙂", ""],
)
def test_tokenizer_round_trips_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_special_token_ids(tokenizer):
    assert len(tokenizer) == 512
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for role_token in ("<|user|>", "<|assistant|>", "<|system|>"):
        (token_id,) = tokenizer.encode(role_token, add_special_tokens=False)
        assert token_id in tokenizer.all_special_ids
    assert tokenizer.decode([1, 3, 100, 2], skip_special_tokens=True) == tokenizer.decode([100])


def test_chat_template_renders_the_generation_prompt(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|system|>Be brief.\n<|user|>Hi!\n<|assistant|>"
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without == "<s><|system|>Be brief.\n<|user|>Hi!\n"


def test_chat_template_ends_assistant_turns_with_eos(tokenizer):
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<s><|user|>Hi!\n<|assistant|>Hello.</s>\n"


def test_padding_is_on_the_left(tokenizer):
    batch = tokenizer(["a much longer text than the other one", "short"], padding=True, return_tensors="pt")
    assert tokenizer.padding_side == "left"
    assert batch["input_ids"][1, 0] == tokenizer.pad_token_id
    assert batch["attention_mask"][1, 0] == 0
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]


# ------------------------------------------------------------------------------------------ models


def test_actor_loads_and_generates(built, tokenizer):
    actor = AutoModelForCausalLM.from_pretrained(built / "actor")
    assert type(actor).__name__ == "LlamaForCausalLM"
    assert actor.config.head_dim >= 32  # vLLM's CPU attention needs it
    assert (actor.config.pad_token_id, actor.config.eos_token_id) == (0, 2)
    prompts = [[{"role": "user", "content": "Write a haiku about tea."}], [{"role": "user", "content": "Hi"}]]
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    output = actor.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=True)
    assert output.shape == (2, batch["input_ids"].shape[1] + 8)


@pytest.mark.parametrize("name", ["critic", "reward"])
def test_value_models_return_one_value_per_sequence(built, tokenizer, name):
    model = AutoModelForSequenceClassification.from_pretrained(built / name)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.head_dim >= 32
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["one text", "another, longer text", "x"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (3, 1)


def test_reward_model_tracks_vowel_ratio_on_fresh_pairs(built, tokenizer):
    """Fresh pairs, scored both from token ids (as a rollout hands them over) and from text."""
    reward = AutoModelForSequenceClassification.from_pretrained(built / "reward").eval()
    prompt_messages = tiny_models.load_prompt_messages()
    examples = tiny_models.sample_reward_examples(tokenizer, prompt_messages, 300, seed=HELDOUT_SEED)
    targets = vowel_ratio(["unused"] * len(examples), [e.response for e in examples])

    from_ids = tokenizer.pad({"input_ids": [e.input_ids for e in examples]}, return_tensors="pt")
    prompt = tokenizer.apply_chat_template(prompt_messages[0], tokenize=False, add_generation_prompt=True)
    from_text = tokenizer([prompt + e.response for e in examples], padding=True, return_tensors="pt")
    for batch in (from_ids, from_text):
        with torch.no_grad():
            predicted = reward(**batch).logits[:, 0].tolist()
        assert statistics.correlation(predicted, targets) > 0.8


# ------------------------------------------------------------------------------- stamp and staging


def test_build_is_deterministic(built, request):
    """Two builds in two processes: this module's, and the session's build/tiny (the set-up's on a fresh machine)."""
    again = request.getfixturevalue("tiny_models")
    assert (again / "actor" / "tokenizer.json").read_bytes() == (built / "actor" / "tokenizer.json").read_bytes()
    for name in ("actor", "critic", "reward"):
        first = load_file(built / name / "model.safetensors")
        second = load_file(again / name / "model.safetensors")
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first), name


def test_rerun_with_matching_stamp_skips_the_build(built, monkeypatch, capsys):
    def must_not_build(directory):
        raise AssertionError("rebuilt although the stamp matches")

    monkeypatch.setattr(tiny_models, "_build_into", must_not_build)
    assert tiny_models.main(["--out", str(built)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_stale_stamp_or_force_rebuilds(tmp_path, monkeypatch):
    target = tmp_path / "models"
    target.mkdir()
    (target / STAMP_NAME).write_text("an older recipe\n")
    (target / "old_file").write_text("old")
    monkeypatch.setattr(tiny_models, "_build_into", fake_build)

    tiny_models.build(target)
    assert (target / "marker").is_file() and not (target / "old_file").exists()
    (target / "marker").unlink()
    tiny_models.build(target, force=True)
    assert (target / "marker").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_interrupted_build_leaves_no_directory(tmp_path, monkeypatch):
    written = []

    def interrupt(model, tokenizer, prompt_messages):
        staging = next(tmp_path.glob(".models.building-*"))
        written.extend(p.name for p in staging.iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_models, "train_reward_model", interrupt)
    with pytest.raises(KeyboardInterrupt):
        tiny_models.build(tmp_path / "models")
    assert {"actor", "critic"} <= set(written)  # the interruption came after files were written
    assert list(tmp_path.iterdir()) == []


def test_interrupted_rebuild_keeps_the_previous_build(tmp_path, monkeypatch):
    target = tmp_path / "models"
    monkeypatch.setattr(tiny_models, "_build_into", fake_build)
    tiny_models.build(target)

    def interrupt(directory):
        fake_build(directory)
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_models, "_build_into", interrupt)
    with pytest.raises(KeyboardInterrupt):
        tiny_models.build(target, force=True)
    assert (target / STAMP_NAME).read_text().strip() == tiny_models.recipe_hash()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
