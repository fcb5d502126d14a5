"""Held-out accuracy of a policy on the arithmetic word problems: greedy answers scored by rlhf_launch.runtime.rewards:math_answer.

    .venv/bin/python bench/heldout_accuracy.py build/smollm2                                   # the base model
    .venv/bin/python bench/heldout_accuracy.py runs/smollm2_grpo_cpu/final/actor               # after training
    .venv/bin/python bench/heldout_accuracy.py build/smollm2 --checkpoint RUN/checkpoints/step-00000012
    .venv/bin/python bench/heldout_accuracy.py build/smollm2 runs/smollm2_grpo_cpu/final/actor --limit 50

Each MODEL is a Hugging Face folder (a run's ``final/actor``, or the base model); ``--checkpoint`` instead loads
the weights of a run's checkpoint (a ``checkpoints/step-NNNNNNNN`` folder or its ``actor.pt``, written without DeepSpeed) into the
architecture of the one MODEL given. Prompts are rendered exactly as the training renders them
(``rlhf_launch.runtime.data.render_prompts``: the tokenizer's chat template, no system prompt unless the template adds
its own), answered greedily with HF ``generate`` (``--max-new-tokens``, default 64, as the spec) and scored
with ``math_answer``: 1 when the last number of the answer equals the record's ``answer``. Prints the
accuracy over all prompts and per ``level`` (the number of operations), and a few answers.

This file lives in bench/, outside pytest's testpaths: a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TEST_SET = REPO / "data" / "prompts" / "arithmetic_test.jsonl"


def read_records(path: Path, limit: int | None) -> list[dict]:
    """The test records (``prompt``, ``answer``, ``level``), the first ``limit`` of them when given."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records[:limit] if limit else records


def load_policy(model_dir: str, checkpoint: str | None):
    """Tokenizer and causal LM (float32, eval mode) of ``model_dir``, with a checkpoint's actor weights when given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(unwrapped(state.get("model", state), set(model.state_dict())), strict=True)
    return tokenizer, model.eval()


def checkpoint_file(path: Path) -> Path:
    """The actor weights file of ``path``: the file itself, or ``actor.pt`` in a checkpoint folder; a missing one
    raises FileNotFoundError naming the run's complete checkpoints (``path`` taken as RUN/checkpoints[/step-N[/file]])."""
    from rlhf_launch.runtime.checkpoint import complete_checkpoints

    file = path / "actor.pt" if path.is_dir() else path
    if file.is_file():
        return file
    run_dir = next((p.parent for p in (path, *path.parents) if p.name == "checkpoints"), None)
    found = [c.name for c in complete_checkpoints(run_dir)] if run_dir is not None else []
    hint = f"; complete checkpoints in {run_dir / 'checkpoints'}: {', '.join(found)}" if found else ""
    why = "no actor.pt in it (a DeepSpeed checkpoint has none)" if path.is_dir() else "no such file or folder"
    raise FileNotFoundError(f"--checkpoint {path}: {why}{hint}")


def unwrapped(weights: dict, expected: set[str]) -> dict:
    """``weights`` named as the bare Hugging Face model names them: the trainer saves the module it wraps (the
    policy as ``model.<HF name>``, or ``module.`` under DDP); the first prefix whose removal gives ``expected`` wins."""
    for prefix in ("", "model.", "module.", "module.model."):
        if {k.removeprefix(prefix) for k in weights} == expected:
            return {k.removeprefix(prefix): v for k, v in weights.items()}
    raise SystemExit(f"the checkpoint's weights ({next(iter(weights))}, ...) do not match the model's ({sorted(expected)[0]}, ...)")


def answer_all(tokenizer, model, records: list[dict], batch_size: int, max_new_tokens: int, max_seq_len: int) -> list[str]:
    """Greedy responses to the records' prompts, decoded without special tokens, in order."""
    import torch

    from rlhf_launch.runtime.data import render_prompts

    responses: list[str] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        batch = render_prompts(tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in chunk], max_seq_len)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        width = batch["input_ids"].shape[1]
        responses += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return responses


def evaluate(label: str, tokenizer, model, records: list[dict], args) -> dict:
    """Accuracy of one policy on ``records``: overall, per level, and the time it took."""
    from rlhf_launch.runtime.rewards import math_answer

    started = time.perf_counter()
    responses = answer_all(tokenizer, model, records, args.batch_size, args.max_new_tokens, args.max_seq_len)
    scores = math_answer([r["prompt"] for r in records], responses, answer=[str(r["answer"]) for r in records])
    per_level: dict[int, list[float]] = defaultdict(list)
    for record, score in zip(records, scores, strict=True):
        per_level[record.get("level", 0)].append(score)
    result = {
        "model": label,
        "accuracy": sum(scores) / len(scores),
        "correct": int(sum(scores)),
        "n": len(scores),
        "per_level": {level: sum(s) / len(s) for level, s in sorted(per_level.items())},
        "seconds": time.perf_counter() - started,
        "examples": [(r["prompt"][-60:], r["answer"], resp) for r, resp in list(zip(records, responses, strict=True))[: args.show]],
    }
    levels = ", ".join(f"level {lv} {acc:.3f} ({len(per_level[lv])})" for lv, acc in result["per_level"].items())
    print(f"{label}: accuracy {result['accuracy']:.3f} ({result['correct']}/{result['n']}); {levels}; {result['seconds']:.1f} s")
    for prompt, expected, response in result["examples"]:
        print(f"    ...{prompt!r} expected {expected}: {response!r}")
    return result


def main(argv: list[str] | None = None) -> int:
    """Evaluate each model given (or one model with a checkpoint's weights) and print the accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="Hugging Face model folders")
    parser.add_argument(
        "--checkpoint", help="a run's checkpoints/step-NNNNNNNN folder (or its actor.pt), loaded into the (single) model given"
    )
    parser.add_argument("--data", default=str(TEST_SET), help="JSONL records with prompt and answer (default: the test split)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--show", type=int, default=3, help="answers printed per model")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.checkpoint and len(args.models) != 1:
        parser.error("--checkpoint takes exactly one model folder (the architecture to load it into)")
    missing = [path for path in [*args.models, args.data] if not Path(path).exists()]
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    if args.checkpoint:
        try:
            args.checkpoint = str(checkpoint_file(Path(args.checkpoint)))
        except FileNotFoundError as exc:
            parser.error(str(exc))

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    records = read_records(Path(args.data), args.limit)
    results = []
    for model_dir in args.models:
        tokenizer, model = load_policy(model_dir, args.checkpoint)
        label = f"{model_dir} + {args.checkpoint}" if args.checkpoint else model_dir
        results.append(evaluate(label, tokenizer, model, records, args))
        del model
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
