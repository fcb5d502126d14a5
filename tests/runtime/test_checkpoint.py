"""Atomic checkpoints: markers, failed saves, pruning, resume resolution, requeue requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rlhf_launch.runtime.checkpoint import (
    CheckpointError,
    checkpoint_step,
    complete_checkpoints,
    latest_checkpoint,
    request_requeue,
    resolve_resume,
    save_checkpoint,
)


def writer(payload: str = "weights"):
    """A ``write`` callback saving one file and one nested file, like a model + optimizer save."""

    def write(folder):
        (folder / "model.bin").write_text(payload)
        (folder / "optim").mkdir()
        (folder / "optim" / "state.bin").write_text(payload + "-optim")

    return write


def names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def make_incomplete(run_dir, step):
    """A step folder as an interrupted save by another tool would leave it: files, no marker."""
    folder = run_dir / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "model.bin").write_text("half")
    return folder


def test_save_writes_files_and_marker_last(tmp_path):
    path = save_checkpoint(tmp_path, 80, writer())
    assert path == tmp_path / "checkpoints" / "step-00000080"
    assert (path / "model.bin").read_text() == "weights"
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker["step"] == 80 and isinstance(marker["time"], float)
    assert marker["files"] == ["model.bin", "optim/state.bin"]
    assert names(tmp_path) == ["step-00000080"]  # no temp folder left behind
    assert checkpoint_step(path) == 80 and latest_checkpoint(tmp_path) == path


def test_failed_write_leaves_no_checkpoint_and_no_temp_folder(tmp_path):
    def write(folder):
        (folder / "model.bin").write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 5, write)
    assert names(tmp_path) == []
    assert latest_checkpoint(tmp_path) is None


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    first = save_checkpoint(tmp_path, 1, writer())
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 2, lambda folder: (_ for _ in ()).throw(RuntimeError("boom")))
    assert latest_checkpoint(tmp_path) == first and names(tmp_path) == ["step-00000001"]


def test_folders_without_a_valid_marker_are_ignored_even_at_higher_steps(tmp_path):
    good = save_checkpoint(tmp_path, 10, writer())
    make_incomplete(tmp_path, 20)
    bad_json = make_incomplete(tmp_path, 30)
    (bad_json / "COMPLETE").write_text("{torn")
    wrong_step = make_incomplete(tmp_path, 40)
    (wrong_step / "COMPLETE").write_text(json.dumps({"step": 41, "time": 0, "files": ["model.bin"]}))
    lost_file = make_incomplete(tmp_path, 50)
    (lost_file / "COMPLETE").write_text(json.dumps({"step": 50, "time": 0, "files": ["model.bin", "gone.bin"]}))
    assert latest_checkpoint(tmp_path) == good
    assert complete_checkpoints(tmp_path) == [good]


def test_latest_of_a_run_without_checkpoints_is_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None


def test_keep_last_prunes_older_complete_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, writer(), keep_last=2)
    assert names(tmp_path) == ["step-00000003", "step-00000004"]
    save_checkpoint(tmp_path, 5, writer(), keep_last=1)
    assert names(tmp_path) == ["step-00000005"]


def test_pruning_spares_incomplete_folders_and_higher_steps(tmp_path):
    incomplete = make_incomplete(tmp_path, 1)
    save_checkpoint(tmp_path, 9, writer())
    save_checkpoint(tmp_path, 2, writer(), keep_last=1)  # resumed from an earlier step
    assert incomplete.exists()
    assert names(tmp_path) == ["step-00000001", "step-00000002", "step-00000009"]


def test_existing_folder_of_the_same_step_is_replaced(tmp_path):
    make_incomplete(tmp_path, 7)  # an earlier attempt died before its marker
    path = save_checkpoint(tmp_path, 7, writer("first"))
    assert (path / "model.bin").read_text() == "first" and latest_checkpoint(tmp_path) == path
    path = save_checkpoint(tmp_path, 7, writer("second"))  # a complete one is replaced too
    assert (path / "model.bin").read_text() == "second"
    assert names(tmp_path) == ["step-00000007"]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folders_of_dead_writers_are_removed(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    dead = root / f".tmp-step-3-{dead_pid()}"
    live = root / f".tmp-step-3-{os.getppid()}"  # a live process: maybe another writer mid-save
    for folder in (dead, live):
        folder.mkdir()
        os.utime(folder, (1, 1))  # long before this save started
    fresh_dead = root / f".tmp-step-4-{dead_pid()}"
    fresh_dead.mkdir()
    os.utime(fresh_dead, (2**31, 2**31))  # "after" the save started: left alone
    save_checkpoint(tmp_path, 4, writer())
    assert not dead.exists() and live.exists() and fresh_dead.exists()


def test_resolve_resume(tmp_path):
    run = tmp_path / "run"
    assert resolve_resume(run, None) is None
    assert resolve_resume(run, "auto") is None  # first start: nothing to resume yet
    save_checkpoint(run, 3, writer())
    latest = save_checkpoint(run, 6, writer())
    make_incomplete(run, 9)
    assert resolve_resume(run, "auto") == latest
    assert resolve_resume(tmp_path / "other", str(run)) == latest  # a run folder: its latest
    assert resolve_resume(tmp_path / "other", str(run / "checkpoints" / "step-00000003")) == run / "checkpoints" / "step-00000003"


@pytest.mark.parametrize(
    "given, message",
    [
        ("missing", "no such file or folder; expected 'auto', a checkpoint folder"),
        (
            "run/checkpoints/step-00000009",
            "no valid COMPLETE marker (an interrupted save?); expected a complete checkpoint (the latest complete one is",
        ),
        ("empty_run", "run folder has no complete checkpoint"),
        ("plain", "neither a checkpoint nor a run folder"),
        ("file.txt", "not a folder"),
    ],
)
def test_resolve_resume_errors_say_what_was_given_and_expected(tmp_path, given, message):
    save_checkpoint(tmp_path / "run", 3, writer())
    make_incomplete(tmp_path / "run", 9)
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "plain").mkdir()
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(CheckpointError, match="resume") as info:
        resolve_resume(tmp_path, str(tmp_path / given))
    assert str(tmp_path / given) in str(info.value) and message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_checkpoint_step_rejects_other_names(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        checkpoint_step(tmp_path / "weights")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, writer(), keep_last=0)
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, writer())


def test_request_requeue_touches_the_file_the_sbatch_script_reads(tmp_path):
    path = request_requeue(tmp_path)
    assert path == tmp_path / "checkpoints" / "requeue" and path.is_file()
    save_checkpoint(tmp_path, 1, writer())  # the flag file is not mistaken for a checkpoint
    assert path.is_file() and latest_checkpoint(tmp_path).name == "step-00000001"


def test_supersede_later_sets_aside_only_later_steps(tmp_path):
    from rlhf_launch.runtime.checkpoint import latest_checkpoint, save_checkpoint, supersede_later

    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, lambda d: (d / "x").write_text("x"), keep_last=5)
    moved = supersede_later(tmp_path, 2)
    assert sorted(p.name.split("-")[2] for p in moved) == ["00000004", "00000006"]
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert all(p.exists() for p in moved)
