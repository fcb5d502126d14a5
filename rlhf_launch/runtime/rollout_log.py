"""The samples of every step, as text: ``RUN_DIR/rollouts.jsonl`` (rollout_config.write_to_file).

One JSON object per sample, in batch order, e.g.::

    {"step": 3, "row": 0, "prompt": "...", "response": "...", "score": 0.42, "reward": 0.31, "response_len": 17}

``prompt`` and ``response`` are the token ids decoded without special tokens (the prompt as the
chat template rendered it); ``score`` is the reward model's raw score, ``reward`` the clipped and
(norm_rewards, reward_scale) normalised score that enters the PPO rewards, ``response_len`` the
response's length in tokens. A non-finite number is written as null.

Only global rank 0 writes. Each step's lines are appended, flushed and fsynced together. A run
resumed from the checkpoint of step k first cuts the file back to its lines with step <= k (as
metrics.jsonl), so the steps it redoes are not written twice and the file equals an
uninterrupted run's.

Importing this module imports no torch: ``rlhf-launch status`` reads the file's last lines on
login nodes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rlhf_launch.runtime.metrics import cut_back

ROLLOUTS_FILE = "rollouts.jsonl"
# The tail read of the status report: enough for a few samples of long responses, grown as needed.
_TAIL_BLOCK = 64 * 1024


def rollouts_path(run_dir: str | os.PathLike) -> Path:
    """The rollouts file of a run folder."""
    return Path(run_dir) / ROLLOUTS_FILE


def _number(value: Any) -> float | None:
    """A score as a JSON number; None for NaN and infinities, which JSON cannot hold."""
    number = float(value)
    return number if math.isfinite(number) else None


def _kept_ids(ids: list[list[int]], mask: list[list[int]]) -> list[list[int]]:
    """Per row, the ids where the mask is 1 (padding dropped)."""
    return [[token for token, keep in zip(row, keep_row, strict=True) if keep] for row, keep_row in zip(ids, mask, strict=True)]


def decode_rows(tokenizer, ids: Any, mask: Any) -> list[str]:
    """The text of each row's ids where ``mask`` is 1 (tensors or nested lists), special tokens dropped: the one
    way prompts and responses become text, for this log and for a reward function or a reward model's tokenizer."""
    return tokenizer.batch_decode(_kept_ids(ids.tolist() if hasattr(ids, "tolist") else ids,
                                            mask.tolist() if hasattr(mask, "tolist") else mask), skip_special_tokens=True)


def sample_records(step: int, experience: Mapping[str, Any], tokenizer) -> list[dict]:
    """The records of one step's samples.

    ``experience`` holds prompt_ids, prompt_mask [B, P], response_ids, response_mask [B, R],
    scores and score_rewards [B] (tensors or nested lists: anything with ``tolist``);
    ``tokenizer`` decodes with ``batch_decode``."""
    missing = [k for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "scores", "score_rewards") if k not in experience]
    if missing:
        raise KeyError(f"rollout log: the experience has no {', '.join(missing)}")
    responses = _kept_ids(experience["response_ids"].tolist(), experience["response_mask"].tolist())
    prompt_texts = decode_rows(tokenizer, experience["prompt_ids"], experience["prompt_mask"])
    response_texts = decode_rows(tokenizer, experience["response_ids"], experience["response_mask"])
    scores, rewards = experience["scores"].tolist(), experience["score_rewards"].tolist()
    return [
        {
            "step": step,
            "row": row,
            "prompt": prompt_texts[row],
            "response": response_texts[row],
            "score": _number(scores[row]),
            "reward": _number(rewards[row]),
            "response_len": len(responses[row]),
        }
        for row in range(len(prompt_texts))
    ]


class RolloutLog:
    """Append each step's samples to rollouts.jsonl.

    ``resume_step=k`` means steps 1..k are done: lines of later steps (written before a crash or
    preemption, and about to be redone) are removed first."""

    def __init__(self, run_dir: str | os.PathLike, tokenizer, resume_step: int = 0):
        self.path = rollouts_path(run_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer = tokenizer
        cut_back(self.path, resume_step)
        self._file = open(self.path, "ab")

    def write(self, step: int, experience: Mapping[str, Any]) -> None:
        """Write the samples of ``step`` durably, all lines at once."""
        if self._file.closed:
            raise ValueError("RolloutLog is closed")
        records = sample_records(step, experience, self.tokenizer)
        # ensure_ascii=False: the texts stay readable in the file; allow_nan=False: numbers are already finite or null.
        lines = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records)
        self._file.write(lines.encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()

    def __enter__(self) -> RolloutLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# --------------------------------------------------------------------------- reading
def _records(lines: list[bytes]) -> list[dict]:
    """The JSON objects among ``lines``; others (a torn last line) are skipped."""
    out = []
    for raw in lines:
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def last_samples(run_dir: str | os.PathLike, count: int = 3) -> list[dict]:
    """The last ``count`` records of rollouts.jsonl, oldest first, reading only the file's tail
    (the file grows by a batch of samples every step). A missing file raises FileNotFoundError."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    with open(rollouts_path(run_dir), "rb") as f:
        end = f.seek(0, os.SEEK_END)
        size = min(end, _TAIL_BLOCK)
        while True:
            f.seek(end - size)
            data = f.read(size)
            # count + 1 newlines: count whole lines after a possibly partial first one.
            if size == end or data.count(b"\n") > count:
                break
            size = min(end, 2 * size)
    lines = data.split(b"\n")
    if size < end:
        lines = lines[1:]  # starts mid-line
    return _records([raw for raw in lines if raw.strip()])[-count:]


def _short(text: str, width: int, keep_end: bool = False) -> str:
    """``text`` on one line, whitespace runs made one space and other unprintable characters "?",
    cut to ``width`` characters with an ellipsis (from the front when ``keep_end``: a prompt's end
    is its question)."""
    flat = "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))
    if len(flat) <= width:
        return flat
    return "…" + flat[-(width - 1):] if keep_end else flat[: width - 1] + "…"


def describe_sample(record: Mapping[str, Any], width: int = 120) -> str:
    """One line for a sample: step, row, score, reward, length, then the prompt's end and the
    response's start, quoted."""
    def num(key: str) -> str:
        value = record.get(key)
        return f"{value:.4g}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"

    head = (f"step {record.get('step')} row {record.get('row')}  score {num('score')}  reward {num('reward')}"
            f"  len {record.get('response_len')}")
    text = max(width - len(head) - 10, 40)  # 10: the separators and quotes
    prompt = _short(str(record.get("prompt", "")), text * 2 // 5, keep_end=True)
    response = _short(str(record.get("response", "")), text - text * 2 // 5)
    return f'{head}  "{prompt}" -> "{response}"'
