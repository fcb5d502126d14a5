"""Generate the project's own small prompt sets (deterministic, rerunnable).

    python data/prompts/generate.py

writes, next to this script:
- tiny_prompts.jsonl: ~300 short chat prompts, {"messages": [{"role": "user", "content": ...}]},
  made from instruction templates x topics; used by the tiny models and the tests.
- arithmetic_train.jsonl / arithmetic_test.jsonl: multi-step arithmetic word problems with their answers,
  {"prompt": ..., "answer": "12", "level": 1..3}, 600 to train on and a held-out 150 (no prompt in both),
  for verifiable rewards (``rlhf_launch.runtime.rewards:math_answer``).
- hh_style_sample.jsonl: ~20 preference pairs in the Anthropic hh-rlhf text format
  ({"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}), some multi-turn, so the
  hh-rlhf parser can be tested offline. All text here is written for this project.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234

TEMPLATES = [
    "Tell me a short fact about {t}.",
    "Write one sentence about {t}.",
    "Explain {t} to a child.",
    "What is the most surprising thing about {t}?",
    "Give me three words that describe {t}.",
    "Write a haiku about {t}.",
    "Why do people care about {t}?",
    "Describe {t} in a cheerful tone.",
    "Summarize the history of {t} in two sentences.",
    "What would a pirate say about {t}?",
    "List two pros and two cons of {t}.",
    "Invent a slogan for {t}.",
    "How would you teach someone about {t}?",
    "Write a tiny story that mentions {t}.",
    "What question would you ask an expert on {t}?",
    "Compare {t} with something from the kitchen.",
    "Give a one-line tip related to {t}.",
    "What is a common myth about {t}?",
    "Describe the sound of {t}.",
    "Write a riddle whose answer is {t}.",
]

TOPICS = [
    "the ocean", "volcanoes", "honey bees", "the moon", "bicycles",
    "rainbows", "old libraries", "owls", "mountain trails", "autumn leaves",
    "paper airplanes", "tea", "lighthouses", "snow", "electric guitars",
]

HH_EXCHANGES = [
    ("How do I boil an egg?",
     "Place the egg in boiling water for about nine minutes, then cool it in cold water.",
     "Eggs are round."),
    ("What is the capital of France?",
     "The capital of France is Paris.",
     "I don't know, look it up yourself."),
    ("Can you suggest a name for a pet turtle?",
     "How about Sheldon, Pebble or Captain Slow?",
     "Turtle."),
    ("Why is the sky blue?",
     "Sunlight is scattered by air molecules, and blue light is scattered the most, so the sky looks blue.",
     "Because it is."),
    ("How many legs does a spider have?",
     "A spider has eight legs.",
     "Spiders have six legs."),
    ("Give me a tip for sleeping better.",
     "Try to go to bed at the same time every night and keep screens out of the bedroom.",
     "Just sleep more."),
    ("What rhymes with cat?",
     "Hat, bat, mat and sat all rhyme with cat.",
     "Dog."),
    ("How do plants make food?",
     "Plants use sunlight, water and carbon dioxide to make sugar in a process called photosynthesis.",
     "They buy it."),
    ("Can you help me write a birthday message for my aunt?",
     "Happy birthday, dear aunt! Thank you for all the laughter and kindness you bring to our family.",
     "Happy birthday I guess."),
    ("What is two plus two?",
     "Two plus two is four.",
     "Two plus two is five."),
    ("How should I store fresh basil?",
     "Keep the stems in a glass of water at room temperature, loosely covered with a bag.",
     "Put it in the freezer next to the ice."),
    ("What does a lighthouse do?",
     "A lighthouse shines a bright light to guide ships and warn them about rocks near the coast.",
     "It is a house that is light."),
    ("Is it safe to look directly at the sun?",
     "No. Looking at the sun can damage your eyes; use proper eclipse glasses instead.",
     "Sure, stare as long as you like."),
    ("Translate 'thank you' into Spanish.",
     "'Thank you' in Spanish is 'gracias'.",
     "Thank you."),
]

FOLLOW_UPS = [
    ("Thanks! Can you make it shorter?", "Of course: here is a shorter version.", "No."),
    ("Why is that?", "Good question. It mostly comes down to how the process works step by step.",
     "Stop asking questions."),
    ("Can you give an example?", "Sure, here is a simple example to make it concrete.", "Examples are boring."),
]


def tiny_prompts() -> list[dict]:
    rows = [
        {"messages": [{"role": "user", "content": template.format(t=topic)}]}
        for template, topic in itertools.product(TEMPLATES, TOPICS)
    ]
    random.Random(SEED).shuffle(rows)  # mixed order so any prefix covers many templates
    return rows


def _hh_text(turns: list[tuple[str, str]]) -> str:
    return "".join(f"\n\nHuman: {human}\n\nAssistant: {assistant}" for human, assistant in turns)


def hh_style_sample() -> list[dict]:
    rng = random.Random(SEED)
    rows = []
    for question, good, bad in HH_EXCHANGES:
        rows.append({"chosen": _hh_text([(question, good)]), "rejected": _hh_text([(question, bad)])})
    # Multi-turn records share every turn except the last assistant reply, as in hh-rlhf.
    for question, good, _ in HH_EXCHANGES[:6]:
        follow_up, good_reply, bad_reply = rng.choice(FOLLOW_UPS)
        shared = [(question, good)]
        rows.append({
            "chosen": _hh_text(shared + [(follow_up, good_reply)]),
            "rejected": _hh_text(shared + [(follow_up, bad_reply)]),
        })
    return rows


NAMES = ["Mia", "Leo", "Ana", "Sam", "Kai", "Zoe", "Ben", "Ivy", "Max", "Eva"]
THINGS = ["apples", "pencils", "stickers", "marbles", "cookies", "stamps", "shells", "books"]
ASK = " Answer with the number only."


def _word_problem(rng: random.Random, level: int) -> tuple[str, int]:
    """One problem of ``level`` steps (1: add or take away; 2: both; 3: boxes of several, then both) and its answer."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    if level == 3:
        boxes, per_box = rng.randint(2, 5), rng.randint(2, 6)
        total = boxes * per_box
        text = f"{name} buys {boxes} boxes of {thing} with {per_box} {thing} in each box."
    else:
        total = rng.randint(2, 20)
        text = f"{name} has {total} {thing}."
    gained = rng.randint(1, 9)
    text += f" {name} gets {gained} more."
    total += gained
    if level >= 2:
        lost = rng.randint(1, total - 1)
        text += f" Then {name} gives {lost} to a friend."
        total -= lost
    return f"{text} How many {thing} does {name} have now?{ASK}", total


def arithmetic(train: int = 600, test: int = 150) -> tuple[list[dict], list[dict]]:
    """Train and held-out problems, a third of each level; a prompt never appears twice."""
    rng, seen, rows = random.Random(SEED + 1), set(), []
    while len(rows) < train + test:
        level = 1 + len(rows) % 3
        prompt, answer = _word_problem(rng, level)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "answer": str(answer), "level": level})
    return rows[:train], rows[train:]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    write_jsonl(HERE / "tiny_prompts.jsonl", tiny_prompts())
    write_jsonl(HERE / "hh_style_sample.jsonl", hh_style_sample())
    train, test = arithmetic()
    write_jsonl(HERE / "arithmetic_train.jsonl", train)
    write_jsonl(HERE / "arithmetic_test.jsonl", test)
    (HERE.parent / "pretrain").mkdir(exist_ok=True)
    write_jsonl(HERE.parent / "pretrain" / "tiny_text.jsonl", tiny_text())


_SUBJECTS = ("The river", "A small bird", "The old library", "My neighbour", "The morning train", "A quiet garden",
             "The baker", "Our team")
_VERBS = ("opens", "watches", "carries", "finds", "remembers", "paints", "builds", "follows")
_OBJECTS = ("the light over the hills", "a letter from a friend", "the sound of rain", "a map of the town",
            "the last page of a book", "a basket of apples", "the path by the sea", "a song about winter")


def tiny_text(count: int = 64) -> list[dict]:
    """Pretraining text for PPO-ptx tests ({"text": ...}): short plain paragraphs of two to four sentences,
    made here from fixed word lists (seeded), of varied lengths so that batches need padding."""
    rng = random.Random(2203)
    rows = []
    for _ in range(count):
        sentences = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}." for _ in range(rng.randint(2, 4))]
        rows.append({"text": " ".join(sentences)})
    return rows


if __name__ == "__main__":
    main()
