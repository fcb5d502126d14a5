"""Submitting a run to Slurm, and following it: ``rlhf-launch status`` and ``cancel``.

Why not submitit: it writes one batch script per job with its own pickled-function payload and
has no heterogeneous-job support (its script never holds ``#SBATCH hetjob``). Our job is a rendered
script (``slurm_script``) whose components each start ``rlhf_launch.runtime.worker`` with srun, so
it is submitted as it is, with ``sbatch --parsable``; the job id is recorded in the run folder.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf_launch.core import metric_catalogue as mc
from rlhf_launch.runtime.metrics import describe_utilization, read_metrics
from rlhf_launch.runtime.rollout_log import describe_sample, last_samples, rollouts_path

JOB_FILE = "job.json"
SAMPLES_SHOWN = 3


class SlurmError(RuntimeError):
    """A Slurm command failed or is missing, or a target names no job; the message says which."""


def _run(args: list[str], timeout: float = 60) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]} not found: is this a Slurm login node? (try --dry-run, or --local)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(args)} did not answer within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise SlurmError(f"{' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def submit(script: str, run_dir: Path) -> str:
    """Write the script into the run folder and submit it; returns the job id."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    path = run_dir / "job.sbatch"
    path.write_text(script)
    out = _run(["sbatch", "--parsable", str(path)]).strip()
    job_id = out.split(";")[0]  # --parsable prints "id" or "id;cluster"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch answered {out!r}, expected a job id")
    record = {"job_id": job_id, "submitted": time.time(), "script": str(path)}
    history = _read_job_file(run_dir).get("history", [])
    (run_dir / JOB_FILE).write_text(json.dumps({**record, "history": [*history, record]}, indent=1) + "\n")
    return job_id


def _read_job_file(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / JOB_FILE).read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class JobState:
    """One hetjob component's state as scontrol reports it."""

    component: int
    job_id: str
    state: str
    reason: str
    nodes: str
    exit_code: str


def component_states(job_id: str) -> list[JobState]:
    """Per hetjob component: state, reason, nodes, exit code (from scontrol; no accounting needed)."""
    out = _run(["scontrol", "show", "job", "-o", job_id])
    states = []
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        states.append(JobState(
            component=int(fields.get("HetJobOffset", 0)), job_id=fields.get("JobId", job_id),
            state=fields.get("JobState", "?"), reason=fields.get("Reason", ""),
            nodes=fields.get("NodeList", ""), exit_code=fields.get("ExitCode", ""),
        ))
    return sorted(states, key=lambda s: s.component)


def resolve_target(target: str) -> tuple[str, Path | None]:
    """A run folder (its recorded job) or a job id (and its run folder, if Slurm knows it)."""
    path = Path(target)
    if path.is_dir():
        job = _read_job_file(path)
        if "job_id" not in job:
            raise SlurmError(f"{path} has no {JOB_FILE}: it was not submitted to Slurm (a --local run?)")
        return job["job_id"], path
    if target.isdigit():
        try:
            out = _run(["scontrol", "show", "job", "-o", target])
            match = re.search(r"WorkDir=(\S+)", out)
            std_out = re.search(r"StdOut=(\S+)", out)
            run_dir = Path(std_out.group(1)).parent.parent if std_out else (Path(match.group(1)) if match else None)
            return target, run_dir if run_dir and (run_dir / "spec.yaml").exists() else None
        except SlurmError:
            return target, None
    raise SlurmError(f"{target!r}: expected a run folder or a Slurm job id")


def status_report(target: str) -> str:
    """What ``rlhf-launch status`` prints for a run folder or a job id: the Slurm job's components,
    the training state and last metrics, the versions it runs with, and where the logs are. A run
    folder without a Slurm job (``--local``) gets the same report, with its lock holder instead."""
    path = Path(target)
    if path.is_dir() and "job_id" not in _read_job_file(path):
        return _local_report(path)
    job_id, run_dir = resolve_target(target)
    lines = [f"job {job_id}" + (f", run folder {run_dir}" if run_dir else "")]
    try:
        states = component_states(job_id)
    except SlurmError as exc:
        states = []
        lines.append(f"  Slurm: {exc}")
    names = _component_names(run_dir)
    for s in states:
        name = names.get(s.component, f"component {s.component}")
        lines.append(
            (
                f"  {name:<10} {s.state:<11} nodes {s.nodes or '-':<10} exit {s.exit_code or '-'}"
                f"  {s.reason if s.reason not in ('None', '') else ''}"
            ).rstrip()
        )
    if run_dir:
        lines += _run_dir_report(run_dir, job_id)
    return "\n".join(lines)


def _component_names(run_dir: Path | None) -> dict[int, str]:
    if not run_dir:
        return {}
    try:
        from rlhf_launch.frontend.spec import load_spec

        plan = load_spec(run_dir / "spec.yaml").plan
        return {c.index: f"{c.name}" for c in plan.components}
    except Exception:  # noqa: BLE001 - a report must not fail for a damaged spec
        return {}


def _local_report(run_dir: Path) -> str:
    if not (run_dir / "spec.yaml").exists() and not (run_dir / "status.json").exists():
        raise SlurmError(f"{run_dir} is not a run folder (no spec.yaml, no status.json)")
    from rlhf_launch.runtime.run_lock import holder

    lines = [f"run folder {run_dir} (run here, not submitted to Slurm)"]
    live = holder(run_dir)
    lines.append(f"  process: {'running, ' + live.describe() if live else 'none running'}")
    lines += _run_dir_report(run_dir, None)
    return "\n".join(lines)


def _provenance_lines(run_dir: Path) -> list[str]:
    """The versions of the latest start, and a note for every resume that ran under versions other
    than the first start's (results of such a run mix two environments)."""
    from rlhf_launch.runtime.provenance import describe_versions, read_records, version_changes

    records = read_records(run_dir)
    if not records:
        return []
    lines = [f"  versions: {describe_versions(records[-1])}"]
    for record in records[1:]:
        changes = version_changes(records[0], record)
        if changes:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.get("time") or 0))
            lines.append(
                f"  note: the resume at step {record.get('start_step')} ({when}) ran under other versions than the first start: "
                f"{'; '.join(changes)}"
            )
    return lines


def _sample_lines(run_dir: Path) -> list[str]:
    """The last few samples of rollouts.jsonl (rollout_config.write_to_file), one short line each;
    nothing when the run writes no such file."""
    try:
        samples = last_samples(run_dir, SAMPLES_SHOWN)
    except OSError:
        return []
    if not samples:
        return []
    return [f"  last samples ({rollouts_path(run_dir)}):", *(f"    {describe_sample(s)}" for s in samples)]


def _run_dir_report(run_dir: Path, job_id: str | None) -> list[str]:
    lines = []
    try:
        status = json.loads((run_dir / "status.json").read_text())
        lines.append(f"  training: {status.get('state')} at step {status.get('step')}/{status.get('max_train_step')}")
        if status.get("error"):
            lines.append(f"  error: {status['error']}")
    except (OSError, ValueError):
        lines.append("  training: not started yet")
    try:
        metrics = read_metrics(run_dir)
        if metrics:
            last = metrics[-1]
            keys = ("step", mc.REWARD_MEAN, mc.KL, mc.POLICY_LOSS, mc.VALUE_LOSS, mc.STEP_TIME_S)
            lines.append(
                "  last metrics: "
                + "  ".join(f"{k} {last[k]:.4g}" if isinstance(last.get(k), float) else f"{k} {last.get(k)}" for k in keys if k in last)
            )
            utilization = describe_utilization(last)
            if utilization:
                lines.append(f"  utilization (busiest rank of each role, step {last.get('step')}): {utilization}")
    except (OSError, ValueError):
        pass
    lines += _sample_lines(run_dir)
    lines += _provenance_lines(run_dir)
    logs = run_dir / "logs"
    if job_id is None:
        lines.append(f"  logs: {logs}/local-rank<N>-<role><R>.log (ranks other than 0, when run with one process per rank)")
        return lines
    lines.append(f"  logs: {logs}/slurm-{job_id}.out and {logs}/{job_id}-<component>-<task>.log")
    failed = _failure_from_logs(logs, job_id)
    if failed:
        lines.append(f"  failed: {failed[0]}")
        lines += [f"    {line}" for line in failed[1]]
    return lines


def _failure_from_logs(logs: Path, job_id: str) -> tuple[str, list[str]] | None:
    """The first rank that reported a failure, and the tail of its log."""
    for log in sorted(logs.glob(f"{job_id}-*.log")):
        text = log.read_text(errors="replace")
        match = re.search(r"^rlhf: (.+? failed: .+)$", text, re.M) or re.search(r"^rlhf: .+ stopping: (.+)$", text, re.M)
        if match and " failed: " in match.group(1):
            return match.group(1), text.strip().splitlines()[-12:]
    return None


def cancel(target: str) -> str:
    """scancel the job of a run folder or job id; returns the job id."""
    job_id, _ = resolve_target(target)
    _run(["scancel", job_id])
    return job_id
