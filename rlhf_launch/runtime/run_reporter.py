"""What a run reports as it goes, written by global rank 0: RUN_DIR/status.json (``rlhf-launch status`` reads
it), metrics.jsonl and TensorBoard, the progress line, and with rollout_config.write_to_file rollouts.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlhf_launch.runtime.metrics import MetricsLogger, StepPrinter
from rlhf_launch.runtime.rollout_log import RolloutLog


def write_status(run_dir: Path, **fields) -> None:
    """Replace RUN_DIR/status.json atomically (``rlhf-launch status`` reads it)."""
    tmp = run_dir / ".status.json.tmp"
    tmp.write_text(json.dumps({"time": time.time(), **fields}) + "\n")
    tmp.replace(run_dir / "status.json")


class RunReporter:
    """What global rank 0 writes as the run goes: status.json, metrics.jsonl and TensorBoard,
    the progress line, and with a ``tokenizer`` (rollout_config.write_to_file) rollouts.jsonl, whose
    log ``rollouts`` the loop writes each step's samples to. Other ranks get ``RunReporter(None, ...)``,
    which writes nothing."""

    def __init__(self, run_dir: Path | None, total: int, start_step: int, quiet: bool, tokenizer=None):
        self.run_dir, self.total = run_dir, total
        self.printer = StepPrinter(total, start_step=start_step) if run_dir is not None and not quiet else None
        self.logger = MetricsLogger(run_dir, resume_step=start_step) if run_dir is not None else None
        self.rollouts = RolloutLog(run_dir, tokenizer, resume_step=start_step) if run_dir is not None and tokenizer is not None else None
        self.history: list[dict] = []

    def status(self, state: str, step: int, **extra) -> None:
        """Replace status.json: the run's state at ``step`` of the total (and any ``extra`` fields)."""
        if self.run_dir is not None:
            write_status(self.run_dir, state=state, step=step, max_train_step=self.total, **extra)

    def step_done(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of a finished step: metrics.jsonl, TensorBoard, the progress line."""
        if self.logger is not None:
            self.history.append(self.logger.log(step, metrics))
        if self.printer is not None:
            self.printer.update(step, metrics)

    def close(self) -> None:
        """Flush and close the metrics file, TensorBoard, the rollouts file and the progress line."""
        for sink in (self.printer, self.logger, self.rollouts):
            if sink is not None:
                sink.close()
