"""rollouts.jsonl: one record per sample, padding left out, resume without duplicated steps,
the status report's tail read and its short lines."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rlhf_launch.runtime import rollout_log
from rlhf_launch.runtime.rollout_log import RolloutLog, describe_sample, last_samples, rollouts_path, sample_records

PAD = 0


class WordTokenizer:
    """Decodes token i as the word ``w<i>``; id 1 is a special token, dropped when asked."""

    def batch_decode(self, rows, skip_special_tokens=False):
        return [" ".join(f"w{i}" for i in row if not (skip_special_tokens and i == 1)) for row in rows]


def experience(step: int) -> dict:
    """Two samples: left-padded prompts, right-padded responses, the second one empty."""
    return {
        "prompt_ids": torch.tensor([[PAD, 1, 5, 6], [1, 7, 8, 9]]),
        "prompt_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]),
        "response_ids": torch.tensor([[10 + step, 11, PAD], [PAD, PAD, PAD]]),
        "response_mask": torch.tensor([[1, 1, 0], [0, 0, 0]]),
        "scores": torch.tensor([2.5, float("nan")]),
        "score_rewards": torch.tensor([1.5, -0.25]),
    }


def lines(run_dir):
    return [json.loads(line) for line in rollouts_path(run_dir).read_text().splitlines()]


def test_one_record_per_sample_without_padding_or_special_tokens():
    records = sample_records(3, experience(3), WordTokenizer())
    assert records == [
        {"step": 3, "row": 0, "prompt": "w5 w6", "response": "w13 w11", "score": 2.5, "reward": 1.5, "response_len": 2},
        {"step": 3, "row": 1, "prompt": "w7 w8 w9", "response": "", "score": None, "reward": -0.25, "response_len": 0},
    ]


def test_an_experience_without_scores_is_refused():
    partial = {k: v for k, v in experience(1).items() if k != "score_rewards"}
    with pytest.raises(KeyError, match="score_rewards"):
        sample_records(1, partial, WordTokenizer())


def test_steps_are_appended_and_a_resume_drops_the_steps_after_its_checkpoint(tmp_path):
    with RolloutLog(tmp_path, WordTokenizer()) as log:
        for step in (1, 2, 3):
            log.write(step, experience(step))
    straight = rollouts_path(tmp_path).read_bytes()
    with rollouts_path(tmp_path).open("ab") as f:
        f.write(b'{"step": 4, "row": 0, "prom')  # torn by a crash in step 4
    with RolloutLog(tmp_path, WordTokenizer(), resume_step=2) as log:
        assert [r["step"] for r in lines(tmp_path)] == [1, 1, 2, 2]
        log.write(3, experience(3))
    assert rollouts_path(tmp_path).read_bytes() == straight


def test_a_fresh_log_in_an_old_folder_starts_empty_and_a_closed_one_refuses(tmp_path):
    with RolloutLog(tmp_path, WordTokenizer()) as log:
        log.write(1, experience(1))
    with RolloutLog(tmp_path, WordTokenizer(), resume_step=0) as log:
        assert rollouts_path(tmp_path).read_bytes() == b""
    with pytest.raises(ValueError, match="closed"):
        log.write(1, experience(1))


@pytest.mark.parametrize("block", [16, 100, 1 << 20])
def test_last_samples_reads_the_tail_whatever_the_block(tmp_path, monkeypatch, block):
    monkeypatch.setattr(rollout_log, "_TAIL_BLOCK", block)
    with RolloutLog(tmp_path, WordTokenizer()) as log:
        for step in range(1, 6):
            log.write(step, experience(step))
    every = lines(tmp_path)
    assert last_samples(tmp_path, 3) == every[-3:]
    assert last_samples(tmp_path, 50) == every
    with rollouts_path(tmp_path).open("ab") as f:
        f.write(b'{"step": 6, "ro')
    assert last_samples(tmp_path, 1) == every[-1:]


def test_last_samples_of_a_missing_file_or_a_bad_count(tmp_path):
    with pytest.raises(FileNotFoundError):
        last_samples(tmp_path)
    with pytest.raises(ValueError, match="count"):
        last_samples(tmp_path, 0)


def test_a_sample_line_is_short_keeping_the_prompts_end_and_the_responses_start():
    record = {"step": 7, "row": 2, "prompt": "system: be kind\nuser: " + "x" * 300 + " what is 2+2?",
              "response": "It is 4.\n\x15" + "y" * 300, "score": 0.123456, "reward": None, "response_len": 40}
    line = describe_sample(record)
    assert line.startswith("step 7 row 2  score 0.1235  reward -  len 40  ")
    assert len(line) == 120
    assert '"…' in line and 'what is 2+2?" -> "It is 4. ?yy' in line and line.endswith('y…"')


def test_importing_the_rollout_log_does_not_import_torch():
    code = "import sys, rlhf_launch.runtime.rollout_log; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
