"""Metrics: durable JSON lines, NaN handling, resume truncation, TensorBoard, console lines."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from rlhf_launch.runtime.metrics import MetricsLogger, StepPrinter, read_metrics


def event_scalars(run_dir, tag):
    """(step, value) pairs of a TensorBoard tag, as TensorBoard itself would read them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def log_steps(run_dir, steps, resume_step=None, tensorboard=False, scale=1.0):
    with MetricsLogger(run_dir, resume_step=resume_step, tensorboard=tensorboard) as logger:
        for step in steps:
            logger.log(step, {"reward_mean": step * scale, "kl": 0.001 * step})


def test_one_json_line_per_step_with_plain_numbers(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        record = logger.log(1, {"reward_mean": torch.tensor(0.5), "kl": np.float32(0.25), "tokens": np.int64(7), "flag": True})
        logger.log(2, {"reward_mean": 1.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "reward_mean": 0.5, "kl": 0.25, "tokens": 7, "flag": 1},
        {"step": 2, "reward_mean": 1.5},
    ]
    assert record == json.loads(lines[0])
    assert type(record["tokens"]) is int and type(record["kl"]) is float


def test_nan_and_inf_become_null_and_are_listed(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"reward_mean": float("nan"), "kl": torch.tensor(float("inf")), "loss": 0.5})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    assert json.loads(text) == {"step": 1, "reward_mean": None, "kl": None, "loss": 0.5, "nan_keys": ["reward_mean", "kl"]}


def test_values_that_are_not_numbers_are_rejected(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(TypeError, match="'reward_mean'.*shape"):
            logger.log(1, {"reward_mean": torch.ones(3)})
        with pytest.raises(TypeError, match="'name'"):
            logger.log(1, {"name": "x"})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(1, {"step": 1})
    assert (tmp_path / "metrics.jsonl").read_text() == ""  # nothing half-written


def test_resume_removes_the_lines_after_k(tmp_path):
    log_steps(tmp_path, range(1, 6))
    before = (tmp_path / "metrics.jsonl").read_bytes()
    log_steps(tmp_path, [], resume_step=3)
    after = (tmp_path / "metrics.jsonl").read_bytes()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert before.startswith(after) and after.endswith(b"\n")  # the first k lines are untouched


def test_resumed_file_is_byte_identical_to_an_uninterrupted_one(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    log_steps(straight, range(1, 7))
    log_steps(resumed, range(1, 6))
    head = (resumed / "metrics.jsonl").read_bytes()
    (resumed / "metrics.jsonl").write_bytes(head + b'{"step": 6, "rew')  # died mid-line too
    log_steps(resumed, range(4, 7), resume_step=3)
    assert (resumed / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()
    assert not list(resumed.glob(".metrics.jsonl.tmp-*"))  # the atomic rewrite left no temp file


def test_truncation_keeps_the_kept_lines_byte_for_byte(tmp_path):
    lines = [b'{"step": 1,   "a": 1.50}\n', b'{"a": 2, "step": 2}\n', b'{"step": 3}\n', b'{"step": 4}\n']
    (tmp_path / "metrics.jsonl").write_bytes(b"".join(lines))
    MetricsLogger(tmp_path, resume_step=2, tensorboard=False).close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == b"".join(lines[:2])
    MetricsLogger(tmp_path, resume_step=0, tensorboard=False).close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == b""


def test_appending_after_a_torn_line_starts_a_new_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1}\n{"step": 2, "kl"')
    log_steps(tmp_path, [2])
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_read_metrics_tolerates_a_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "kl": 0.5}\n{"step": 2, "kl": 0.')
    assert read_metrics(tmp_path) == [{"step": 1, "kl": 0.5}]
    path.write_bytes(b'{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: .*damaged"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "missing")


def test_tensorboard_gets_the_same_scalars(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"reward_mean": 0.5, "kl": float("nan")})
        logger.log(2, {"reward_mean": torch.tensor(0.75), "kl": 0.01})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert event_scalars(tmp_path, "reward_mean") == [(1, 0.5), (2, 0.75)]
    steps = [s for s, _ in event_scalars(tmp_path, "kl")]
    assert steps == [2]  # the NaN is null in the file and absent from TensorBoard
    assert math.isclose(event_scalars(tmp_path, "kl")[0][1], 0.01, rel_tol=1e-6)


def test_tensorboard_purges_the_redone_steps_on_resume(tmp_path):
    log_steps(tmp_path, [1, 2, 3], tensorboard=True, scale=-1.0)
    time.sleep(1.1)  # event files are ordered by their creation second
    log_steps(tmp_path, [3], resume_step=2, tensorboard=True)
    assert event_scalars(tmp_path, "reward_mean") == [(1, -1.0), (2, -2.0), (3, 3.0)]


def test_importing_metrics_does_not_import_torch():
    code = "import sys, rlhf_launch.runtime.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_printer_writes_one_line_per_step_when_not_a_tty():
    stream = io.StringIO()
    with StepPrinter(40, stream=stream) as printer:
        printer.update(3, {"reward_mean": 0.1234567, "kl": torch.tensor(0.0012), "policy_loss": -0.05, "step_time_s": 12.34})
        printer.update(4, {"reward_mean": None, "other": 1.0})
    first, second = stream.getvalue().splitlines()
    assert first == "step  3/40  reward 0.1235  kl 0.0012  policy_loss -0.05  12.3 s"
    assert second.startswith("step  4/40  reward nan  ") and second.endswith(" s") and "other" not in second


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_printer_shows_a_progress_bar_on_a_tty():
    stream = FakeTerminal()
    printer = StepPrinter(10, stream=stream)
    printer.update(1, {"reward_mean": 0.5, "kl": 0.25})
    printer.close()
    printer.close()
    text = stream.getvalue()
    assert "reward 0.5" in text and "kl 0.25" in text and "1/10" in text
