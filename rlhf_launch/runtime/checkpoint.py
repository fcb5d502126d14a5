"""Atomic checkpoints of a run folder.

Layout::

    <run_dir>/checkpoints/step-00000080/   files written by the caller + COMPLETE
    <run_dir>/checkpoints/.tmp-step-80-<pid>/   a save in progress (or one that died)
    <run_dir>/checkpoints/requeue          asks the sbatch script to requeue the job

A checkpoint is complete once its ``COMPLETE`` marker (JSON: step, time, files) exists;
the marker is written last, after every file is fsynced, inside a temporary folder that
is then renamed into place. A crash at any point therefore leaves either the previous
set of complete checkpoints or the new one, never a half-written folder that looks
complete. Readers (``latest_checkpoint``, ``resolve_resume``) trust only the marker.

This module imports nothing heavy (no torch): the caller's ``write`` does the saving.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from rlhf_launch.core.problems import InputError

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
REQUEUE = "requeue"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(InputError, ValueError):
    """A checkpoint path that is missing, incomplete or not a checkpoint at all."""


# --------------------------------------------------------------------------- names
def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    """The folder holding a run's checkpoints."""
    return Path(run_dir) / CHECKPOINTS


def checkpoint_name(step: int) -> str:
    """``step-00000080``: zero-padded so that names sort like steps."""
    return f"step-{step:08d}"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The PPO step of a checkpoint folder, read from its name ``step-<N>``."""
    match = _STEP_DIR.match(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path}: not a checkpoint folder; expected a name like {checkpoint_name(80)}")
    return int(match.group(1))


# --------------------------------------------------------------------------- reading
def read_marker(path: str | os.PathLike) -> dict | None:
    """The parsed COMPLETE marker of a checkpoint folder, or None if it is missing or invalid.

    Valid means: a JSON object whose step matches the folder name and whose listed
    files all exist (a checkpoint with a file deleted afterwards cannot be resumed).
    """
    path = Path(path)
    try:
        step = checkpoint_step(path)
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (CheckpointError, OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("step") != step:
        return None
    files = marker.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) and (path / f).is_file() for f in files):
        return None
    return marker


def is_complete(path: str | os.PathLike) -> bool:
    """True for a checkpoint folder with a valid COMPLETE marker."""
    return read_marker(path) is not None


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """A run's complete checkpoints, lowest step first (incomplete folders are left out)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir() and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None.

    A folder without a valid marker is ignored even when its step is higher: it is a
    save that was interrupted, or not a checkpoint of ours.
    """
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(run_dir: str | os.PathLike, resume: str | os.PathLike | None) -> Path | None:
    """The checkpoint to resume from, given the ``--resume`` value.

    None: start fresh. ``"auto"``: this run's latest complete checkpoint, or None when
    there is none yet (a first start and a requeued one use the same command line).
    Otherwise a path: a complete checkpoint folder, or a run folder whose latest complete
    checkpoint is used; anything else raises CheckpointError.
    """
    if resume is None:
        return None
    if str(resume) == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume).expanduser()
    expected = f"expected 'auto', a checkpoint folder like <run>/{CHECKPOINTS}/{checkpoint_name(80)} or a run folder"
    if not path.exists():
        raise CheckpointError(f"resume {str(resume)!r}: no such file or folder; {expected}")
    if not path.is_dir():
        raise CheckpointError(f"resume {str(resume)!r}: not a folder; {expected}")
    if _STEP_DIR.match(path.name):
        if is_complete(path):
            return path
        raise CheckpointError(
            f"resume {str(resume)!r}: checkpoint has no valid {MARKER} marker (an interrupted save?); "
            f"expected a complete checkpoint{_latest_hint(path.parent.parent)}"
        )
    if checkpoints_dir(path).is_dir():
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest
        raise CheckpointError(
            f"resume {str(resume)!r}: run folder has no complete checkpoint in {checkpoints_dir(path)}; "
            "expected a run that saved at least once"
        )
    raise CheckpointError(f"resume {str(resume)!r}: neither a checkpoint nor a run folder (no {CHECKPOINTS}/ inside); {expected}")


def _latest_hint(run_dir: Path) -> str:
    latest = latest_checkpoint(run_dir)
    return f" (the latest complete one is {latest})" if latest is not None else ""


# --------------------------------------------------------------------------- writing
def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    write: Callable[[Path], None],
    keep_last: int = 2,
) -> Path:
    """Save checkpoint ``step`` atomically and return its folder.

    ``write(tmp_dir)`` writes the caller's files into a fresh temporary folder. Then the
    files are fsynced, the COMPLETE marker is written last, and the folder is renamed to
    ``checkpoints/step-<N>`` (replacing a folder of that name). Finally the older complete
    checkpoints beyond ``keep_last`` and stale temporary folders of dead writers are deleted.
    If ``write`` raises, its temporary folder is removed and the exception propagates.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (the new checkpoint is always kept), got {keep_last}")
    started = time.time()
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_TMP_PREFIX}step-{step}-{os.getpid()}"
    if tmp.exists():  # left by an earlier attempt of this same process
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        files = _fsync_tree(tmp)
        _write_marker(tmp, step, files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = root / checkpoint_name(step)
    _move_into_place(tmp, final)
    _prune(root, final, keep_last, started)
    return final


def request_requeue(run_dir: str | os.PathLike) -> Path:
    """Ask the sbatch script to requeue the job once this (preemption) checkpoint is written."""
    path = checkpoints_dir(run_dir) / REQUEUE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    _fsync_dir(path.parent)
    return path


def _write_marker(folder: Path, step: int, files: list[str]) -> None:
    """Write COMPLETE and make it durable: once it exists, the checkpoint counts."""
    marker = {"step": step, "time": time.time(), "files": files}
    with open(folder / MARKER, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_tree(folder: Path) -> list[str]:
    """fsync every file and folder under ``folder``; return the files, relative, sorted."""
    files = []
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath) / name
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files.append(path.relative_to(folder).as_posix())
        _fsync_dir(Path(dirpath))
    return sorted(f for f in files if f != MARKER)


def _fsync_dir(folder: Path) -> None:
    """fsync a folder so that the names created in it (files, renames) survive a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished temporary folder to its final name.

    rename(2) cannot replace a non-empty folder, so an existing one (complete or not) is
    first renamed aside under a ``.tmp-*-<pid>`` name: if we die in between, the stale-folder
    cleanup of a later save removes it.
    """
    aside = None
    if final.exists():
        aside = final.parent / f"{_TMP_PREFIX}replaced-{final.name}-{os.getpid()}"
        if aside.exists():
            shutil.rmtree(aside)
        os.rename(final, aside)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _prune(root: Path, new: Path, keep_last: int, started: float) -> None:
    """Delete complete checkpoints older than the newest ``keep_last`` and dead writers' temp folders."""
    step = checkpoint_step(new)
    # Only lower steps are "older"; higher ones (from a run resumed at an earlier step) are left alone.
    older = [p for p in complete_checkpoints(root.parent) if checkpoint_step(p) < step]
    for path in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    for path in root.iterdir():
        if path.name.startswith(_TMP_PREFIX) and _is_stale_tmp(path, started):
            shutil.rmtree(path, ignore_errors=True)


def _is_stale_tmp(path: Path, started: float) -> bool:
    """A temp folder is stale if it predates this save and its writer's pid is not alive.

    Both conditions are required: a live pid may be another writer mid-save, and a folder
    created after this save started may belong to a writer whose pid we cannot see.
    """
    pid_text = path.name.rsplit("-", 1)[-1]
    if not pid_text.isdigit():
        return False
    try:
        if path.stat().st_mtime >= started:
            return False
    except FileNotFoundError:
        return False
    return not _pid_alive(int(pid_text))


def _pid_alive(pid: int) -> bool:
    # pid 0 would probe our own process group: treat it, like our own pid, as alive.
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def supersede_later(run_dir: str | os.PathLike, step: int) -> list[Path]:
    """Set aside the checkpoints after ``step`` when a run restarts from an earlier one.

    They belong to the abandoned continuation; renamed (never deleted), so that a later
    ``--resume auto`` finds the new continuation's checkpoints and not these.
    """
    moved = []
    stamp = int(time.time())
    for path in sorted(checkpoints_dir(run_dir).glob("step-*")):
        if _STEP_DIR.match(path.name) and checkpoint_step(path) > step:
            target = path.with_name(f"superseded-{path.name}-{stamp}")
            path.rename(target)
            moved.append(target)
    return moved
