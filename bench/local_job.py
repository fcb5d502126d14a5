"""What the benchmarks that time whole jobs share: running one ``rlhf-launch --local --processes`` job and
printing medians side by side. A helper of bench/pipeline.py and bench/score_phase.py, not a benchmark."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_local_job(spec: Path, out: Path, name: str, overrides: Sequence[str], *, env: dict[str, str] | None = None,
                  started: Callable[[subprocess.Popen], None] | None = None) -> list[dict]:
    """Run ``spec`` with ``overrides`` as ``rlhf-launch --local --processes`` into ``out/name`` and return its
    metrics rows; ``started(launcher)`` is called once the launcher process is up (to pin its ranks, say).
    A failed run ends the benchmark with the launcher's last error lines."""
    from rlhf_launch.runtime.metrics import read_metrics

    args = [sys.executable, "-m", "rlhf_launch", str(spec), "--local", "--processes", "--no-check",
            "--output-dir", str(out), "--set", f"run.name={name}"]
    for override in overrides:
        args += ["--set", override]
    env = dict(os.environ if env is None else env)
    # A rank that aborts in C++ (SIGABRT) then prints every thread's Python stack into its log.
    env.setdefault("PYTHONFAULTHANDLER", "1")
    launcher = subprocess.Popen(args, cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if started is not None:
            started(launcher)
        _, err = launcher.communicate(timeout=1800)
    finally:
        if launcher.poll() is None:  # a benchmark stopped early leaves no job behind
            launcher.terminate()
            launcher.wait(timeout=60)
    if launcher.returncode != 0:  # the rank logs go with the benchmark's temporary folder: show their ends now
        logs = "".join(f"\n--- {log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                       for log in sorted((out / name / "logs").glob("*.log")))
        sys.exit(f"the {name} run failed:\n{err[-3000:]}{logs}")
    return read_metrics(out / name)


def print_columns(title: str, columns: Sequence[str], lines: Sequence[tuple[str, Sequence[float], str]]) -> None:
    """A table: ``title`` over a label column, then one right-aligned column per name in ``columns``; each line is
    (label, one value per column, format such as ``.3f``)."""
    width = max(13, *(len(c) + 1 for c in columns))
    print(f"{title:<34}" + "".join(f"{c:>{width}}" for c in columns))
    for label, values, fmt in lines:
        print(f"{label:<34}" + "".join(f"{v:>{width}{fmt}}" for v in values))
