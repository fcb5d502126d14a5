"""Per-step training metrics: a crash-safe JSON-lines file, TensorBoard, and console progress.

``<run_dir>/metrics.jsonl`` holds one JSON object per PPO step, ``{"step": 3, "reward_mean": 0.12, ...}``.
Each line is flushed and fsynced as it is written, so a crash loses at most the line being
written (a torn last line, which readers skip). Values are JSON numbers; a NaN or infinite
value is written as null and its key listed in the object's ``nan_keys``.

A resumed run (``resume_step=k``: steps 1..k are done and checkpointed) first cuts the file
back to its lines with step <= k, so that its file ends up equal to an uninterrupted run's.
TensorBoard gets the same scalars under ``<run_dir>/tensorboard/``; on resume its writer
purges the events after step k the same way.

Every key a step logs, with its unit, its meaning and the module that logs it, is in the metric catalogue,
rlhf_launch/core/metric_catalogue.py (the README's "Metrics" list is rendered from it); code spells the keys
with its constants. A record holds only what its step measured (no kl without a reference, no value_loss
without a critic). The timings (<section>_time_s, busy_<role>_s, util_<role>, score_<role>_time_s,
gen_tokens_per_s) differ between any two runs; a role's figures are the maximum over its ranks, which reach
rank 0 in one all-reduce after the step's clock stopped (in one process, that process's).

Importing this module imports neither torch nor rich: the launcher (``rlhf-launch plot``)
reads metrics on login nodes. Only one process (rank 0) should log.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from rlhf_launch.core import metric_catalogue as mc

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
NAN_KEYS = "nan_keys"
_RESERVED = ("step", NAN_KEYS)


def metrics_path(run_dir: str | os.PathLike) -> Path:
    """The metrics file of a run folder."""
    return Path(run_dir) / METRICS_FILE


# --------------------------------------------------------------------------- reading
def _parse_line(raw: bytes) -> dict | None:
    """One metrics record, or None if the line is not a JSON object."""
    try:
        record = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return None
    return record if isinstance(record, dict) else None


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All records of ``<run_dir>/metrics.jsonl``, in file order.

    A torn last line (the run died while writing it) is skipped; a bad line anywhere else
    means the file was damaged some other way and raises ValueError. A missing file raises
    FileNotFoundError.
    """
    path = metrics_path(run_dir)
    lines = [(n, raw) for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1) if raw.strip()]
    records = []
    for i, (lineno, raw) in enumerate(lines):
        record = _parse_line(raw)
        if record is None:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{lineno}: not a JSON object; the metrics file is damaged")
        records.append(record)
    return records


def describe_utilization(record: Mapping[str, Any]) -> str | None:
    """The util_<role> figures of one metrics record on one line, e.g. ``actor 62%  critic 31%  reward 9%`` (in
    the record's order); None when the record has none (a run from before they were logged)."""
    parts = [f"{role} {100 * value:.0f}%" for key, value in record.items()
             if (role := mc.UTIL.value_of(key)) is not None and isinstance(value, numbers.Real) and not isinstance(value, bool)]
    return "  ".join(parts) if parts else None


# --------------------------------------------------------------------------- values
def to_number(key: str, value: Any) -> int | float:
    """A metric value as a plain int or float.

    Accepts Python numbers, numpy scalars and one-element tensors/arrays (via ``.item()``,
    so that neither torch nor numpy needs importing here). Booleans become 0/1.
    """
    item = getattr(value, "item", None)
    if not isinstance(value, numbers.Number) and callable(item):
        try:
            value = item()
        except (ValueError, RuntimeError) as exc:  # numpy: ValueError; torch: RuntimeError
            shape = tuple(getattr(value, "shape", ()))
            raise TypeError(f"metric {key!r}: expected a number or a one-element tensor, got shape {shape}") from exc
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__} {value!r}")


def make_record(step: int, metrics: Mapping[str, Any]) -> dict:
    """The JSON object of one step: step, the metrics as numbers, and ``nan_keys`` if any.

    JSON has no NaN/Infinity, so a non-finite value is written as null and named in
    ``nan_keys``: the line stays valid JSON and the divergence stays visible.
    """
    record: dict[str, Any] = {"step": operator.index(step)}
    nan_keys = []
    for key, value in metrics.items():
        if key in _RESERVED:
            raise ValueError(f"metric name {key!r} is reserved")
        number = to_number(key, value)
        if isinstance(number, float) and not math.isfinite(number):
            nan_keys.append(key)
            number = None
        record[key] = number
    if nan_keys:
        record[NAN_KEYS] = nan_keys
    return record


# --------------------------------------------------------------------------- file edits
def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _kept_lines(data: bytes, resume_step: int | None) -> bytes:
    """The whole lines of ``data`` to keep: all of them, or those with step <= resume_step.

    The piece after the last newline is a torn line and is always dropped, so that the
    next record starts on a line of its own. Kept lines are kept byte for byte.
    """
    lines = data.split(b"\n")[:-1]
    if resume_step is not None:
        lines = [raw for raw in lines if _step_at_most(raw, resume_step)]
    return b"".join(raw + b"\n" for raw in lines)


def _step_at_most(raw: bytes, limit: int) -> bool:
    record = _parse_line(raw)
    step = record.get("step") if record else None
    return isinstance(step, int) and not isinstance(step, bool) and step <= limit


def cut_back(path: Path, resume_step: int | None) -> None:
    """Cut a JSON-lines file of step records back to whole lines (and to step <= resume_step
    when resuming), atomically; a missing file is left missing. Shared by every per-step log."""
    if not path.exists():
        return
    data = path.read_bytes()
    kept = _kept_lines(data, resume_step)
    if kept != data:
        _write_atomically(path, kept)


# --------------------------------------------------------------------------- logger
class MetricsLogger:
    """Append one record per PPO step to metrics.jsonl (and TensorBoard).

    ``resume_step=k`` means steps 1..k are done: records after k (written before a crash or
    preemption, and about to be redone) are removed first. ``resume_step=None`` appends to
    whatever the file holds.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = metrics_path(self.run_dir)
        self._repair(resume_step)
        self._file = open(self.path, "ab")
        try:
            self._tb = self._tensorboard_writer(resume_step) if tensorboard else None
        except BaseException:
            self._file.close()
            raise

    def _repair(self, resume_step: int | None) -> None:
        """Cut the file back to whole lines (and to step <= resume_step when resuming)."""
        cut_back(self.path, resume_step)

    def _tensorboard_writer(self, resume_step: int | None):
        # Imported here: torch must not load when the launcher only reads metrics.
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides the events at steps >= k+1 left by the interrupted run.
        purge = None if resume_step is None else resume_step + 1
        return SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Write the record of ``step`` durably and return it."""
        if self._file.closed:
            raise ValueError("MetricsLogger is closed")
        record = make_record(step, metrics)
        line = json.dumps(record, allow_nan=False) + "\n"
        self._file.write(line.encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            self._log_tensorboard(record)
        return record

    def _log_tensorboard(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key not in _RESERVED and value is not None:
                self._tb.add_scalar(key, value, step)
        # A PPO step takes seconds: flushing every step costs nothing and loses nothing on a crash.
        self._tb.flush()

    def close(self) -> None:
        """Close the file and the TensorBoard writer (idempotent)."""
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# --------------------------------------------------------------------------- console
def _show(key: str, value: Any) -> str:
    """A metric for the console: 4 significant digits; ``nan`` for a null (NaN-logged) value."""
    if value is None:
        return "nan"
    number = to_number(key, value)
    return f"{number:.4g}" if isinstance(number, float) else str(number)


class StepPrinter:
    """Progress of the PPO steps on the console.

    On a terminal: a rich progress bar with live reward_mean, kl and step-time columns.
    Otherwise (Slurm logs, pipes): one compact line per step, e.g.
    ``step  3/40  reward 0.123  kl 0.0012  policy_loss 0.05  value_loss 0.31  12.3 s``.
    The step time is ``metrics["step_time_s"]`` (or ``"step_time"``) when given, else the time
    since the last update.
    """

    LINE_KEYS = ((mc.REWARD_MEAN, "reward"), (mc.KL, "kl"), (mc.POLICY_LOSS, "policy_loss"), (mc.VALUE_LOSS, "value_loss"))
    TIME_KEYS = (mc.STEP_TIME_S, "step_time")  # step_time: what a caller of update() may name it

    def __init__(self, total_steps: int, stream: IO[str] | None = None, start_step: int = 0):
        self.total_steps = total_steps
        self.stream = stream if stream is not None else sys.stdout
        self._last = time.monotonic()
        isatty = getattr(self.stream, "isatty", None)
        self._progress = self._start_progress(start_step) if callable(isatty) and isatty() else None

    def _start_progress(self, start_step: int):
        # rich is imported only for terminals: batch jobs never need it.
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("PPO"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("reward {task.fields[reward]}"),
            TextColumn("kl {task.fields[kl]}"),
            TextColumn("{task.fields[step_time]}"),
            TimeRemainingColumn(),
            console=Console(file=self.stream),
        )
        self._task = progress.add_task("ppo", total=self.total_steps, completed=start_step, reward="-", kl="-", step_time="-")
        progress.start()
        return progress

    def _step_time(self, metrics: Mapping[str, Any]) -> float:
        now = time.monotonic()
        elapsed, self._last = now - self._last, now
        for key in self.TIME_KEYS:
            if metrics.get(key) is not None:
                return to_number(key, metrics[key])
        return elapsed

    def format_line(self, step: int, metrics: Mapping[str, Any], seconds: float) -> str:
        """The non-terminal line of one step (keys missing from ``metrics`` are left out)."""
        width = len(str(self.total_steps))
        parts = [f"step {step:>{width}}/{self.total_steps}"]
        for key, label in self.LINE_KEYS:
            if key in metrics:
                parts.append(f"{label} {_show(key, metrics[key])}")
        parts.append(f"{seconds:.1f} s")
        return "  ".join(parts)

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Show that ``step`` finished with these metrics."""
        seconds = self._step_time(metrics)
        if self._progress is None:
            print(self.format_line(step, metrics, seconds), file=self.stream, flush=True)
            return
        # The bar shows reward and kl only: the others would not fit on one terminal line.
        fields = {label: _show(key, metrics[key]) for key, label in self.LINE_KEYS[:2] if key in metrics}
        self._progress.update(self._task, completed=step, step_time=f"{seconds:.1f} s/step", **fields)

    def close(self) -> None:
        """Stop the progress bar (idempotent)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> StepPrinter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

