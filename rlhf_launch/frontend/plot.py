"""`rlhf-launch plot RUN_DIR [--metrics KEY,...]`: curves of a run's metrics, as a PNG.

Reads ``<run_dir>/metrics.jsonl`` (written by ``rlhf_launch.runtime.metrics.MetricsLogger``) and draws the
chosen metrics over the PPO steps, one panel each, to ``<run_dir>/curves.png``. The default is
reward_mean and kl; a run without a reference logs no kl, and gets reward_mean and
response_len_mean instead. Any other keys: ``--metrics reward_mean,response_len_mean,filtered_frac`` (every key
and its meaning: rlhf_launch/core/metric_catalogue.py, the README's "Metrics").
Imports no torch, and matplotlib only when plotting; figures are drawn with the Agg
canvas directly, so no display and no global backend switch are needed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rlhf_launch.core import metric_catalogue as mc
from rlhf_launch.runtime.metrics import METRICS_FILE, read_metrics

CURVES = (mc.REWARD_MEAN, mc.KL)
NO_KL_CURVES = (mc.REWARD_MEAN, mc.RESPONSE_LEN_MEAN)  # the default for a run without a reference, which logs no kl
DEFAULT_PNG = "curves.png"
SMOOTH_ABOVE = 10  # points; fewer are readable as they are


class PlotError(Exception):
    """A run folder that cannot be plotted (missing, no metrics, damaged metrics)."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def logged_keys(records: list[dict]) -> set[str]:
    """The keys besides step that hold a number in at least one record."""
    return {k for r in records for k, v in r.items() if k != "step" and _is_number(v)}


def default_keys(records: list[dict]) -> tuple[str, ...]:
    """reward_mean and kl; reward_mean and response_len_mean for a run that logs no kl but the response length."""
    logs = logged_keys(records)
    return NO_KL_CURVES if mc.KL not in logs and mc.RESPONSE_LEN_MEAN in logs else CURVES


def load_curves(run_dir: Path, keys: Sequence[str] | None = None) -> dict[str, tuple[list[int], list[float]]]:
    """(steps, values) of each of ``keys`` (default: ``default_keys``), in order; null (NaN) values and records
    without the key are skipped."""
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: no such run folder")
    try:
        records = read_metrics(run_dir)
    except FileNotFoundError:
        raise PlotError(f"{run_dir}: no {METRICS_FILE} (has the run logged a step yet?)") from None
    except ValueError as exc:
        raise PlotError(str(exc)) from None
    keys = default_keys(records) if keys is None else keys
    curves = {}
    for key in keys:
        points = [(r["step"], r[key]) for r in records if "step" in r and _is_number(r.get(key))]
        curves[key] = ([s for s, _ in points], [float(v) for _, v in points])
    if not any(steps for steps, _ in curves.values()):
        logged = sorted(logged_keys(records))
        hint = f"; it logs: {', '.join(logged)} (choose with --metrics)" if logged else ""
        raise PlotError(f"{run_dir / METRICS_FILE}: no {' or '.join(keys)} values to plot{hint}")
    return curves


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points; the first ``window - 1`` points have none."""
    sums, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        if i >= window - 1:
            sums.append(total / window)
    return sums


def smoothing_window(n: int) -> int:
    """About a tenth of the points, at least 2 and at most 50 steps."""
    return max(2, min(50, n // 10))


def _draw(ax, key: str, steps: list[int], values: list[float], window: int) -> None:
    ax.set_title(key)
    ax.set_ylabel(key)
    ax.grid(True, alpha=0.3)
    if not steps:
        ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
        return
    ax.plot(steps, values, marker="." if len(steps) <= SMOOTH_ABOVE else None, alpha=0.5, label=key)
    if len(steps) > SMOOTH_ABOVE:
        window = min(window, len(steps))  # a sparse curve beside a dense one
        ax.plot(steps[window - 1:], moving_average(values, window), linewidth=2, label=f"moving average ({window} steps)")
    ax.legend(loc="best")


def plot_run(run_dir: str | Path, out: str | Path | None = None, keys: Sequence[str] | None = None) -> Path:
    """Draw the run's curves of ``keys`` (default: reward_mean and kl, or response_len_mean in kl's place for a run
    that logs no kl) into ``out`` (default ``<run_dir>/curves.png``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    curves = load_curves(run_dir, keys)
    keys = tuple(curves)
    out = Path(out) if out is not None else run_dir / DEFAULT_PNG
    fig = Figure(figsize=(8, 1 + 2.5 * len(keys)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    # One window for every panel (from the longest curve), so that they smooth alike.
    window = smoothing_window(max(len(steps) for steps, _ in curves.values()))
    for ax, key in zip(axes, keys, strict=True):
        _draw(ax, key, *curves[key], window)
    axes[-1].set_xlabel("PPO step")
    fig.suptitle(f"run {run_dir.resolve().name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out


def metric_keys(text: str) -> tuple[str, ...]:
    """The comma-separated keys of ``--metrics``, each once, in the order given."""
    keys = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    if not keys:
        raise argparse.ArgumentTypeError("give at least one key, e.g. reward_mean,response_len_mean")
    return keys


def main(argv: Sequence[str] | None = None) -> int:
    """``rlhf-launch plot RUN_DIR [--out PNG] [--metrics KEY,...]``: print the PNG written; exit status 2 on a bad
    run folder or metrics it has not logged."""
    p = argparse.ArgumentParser(prog="rlhf-launch plot", description="Plot metrics of a run (default reward_mean and kl).")
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="run folder holding metrics.jsonl")
    p.add_argument("--out", metavar="PNG", type=Path, help=f"image to write (default RUN_DIR/{DEFAULT_PNG})")
    p.add_argument(
        "--metrics", metavar="KEY,...", type=metric_keys, default=None,
        help=f"metrics.jsonl keys to plot, one panel each (default {','.join(CURVES)}; {','.join(NO_KL_CURVES)} for a run "
        "without a reference, which logs no kl)",
    )
    args = p.parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.out, args.metrics)
    except PlotError as exc:
        print(f"rlhf-launch plot: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
