"""The run-folder lock: a live run keeps others out, naming itself; a dead run's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from rlhf_launch.frontend.cli import main
from rlhf_launch.runtime.run_lock import LOCK_FILE, RunLock, RunLocked, holder
from tests.conftest import ROOT

TINY = ROOT / "specs" / "tiny_cpu.yaml"


def test_a_held_lock_names_its_holder_and_keeps_a_second_run_out(tmp_path):
    assert holder(tmp_path) is None and not (tmp_path / LOCK_FILE).exists()  # checking creates nothing
    with RunLock.acquire(tmp_path) as lock:
        assert lock.taken_over is None
        found = holder(tmp_path)
        assert (found.pid, found.host) == (os.getpid(), socket.gethostname())
        # flock belongs to an open file: a second acquire conflicts even within this process
        with pytest.raises(RunLocked, match=f"is in use by the run of pid {os.getpid()} on {socket.gethostname()}"):
            RunLock.acquire(tmp_path, retry_s=0.2)
    assert holder(tmp_path) is None
    assert json.loads((tmp_path / LOCK_FILE).read_text())["released"]
    with RunLock.acquire(tmp_path) as again:
        assert again.taken_over is None  # a run that ended properly is not "taken over"


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    code = (
        "import sys, time\n"
        "from rlhf_launch.runtime.run_lock import RunLock\n"
        f"RunLock.acquire({str(tmp_path)!r})\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        assert holder(tmp_path).pid == child.pid
        with pytest.raises(RunLocked):
            RunLock.acquire(tmp_path, retry_s=0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert holder(tmp_path) is None  # the kernel dropped the dead process's flock
    with RunLock.acquire(tmp_path) as lock:
        assert lock.taken_over is not None and lock.taken_over.pid == child.pid
        assert holder(tmp_path).pid == os.getpid()


def test_a_file_system_without_locks_lets_the_run_go_on_unprotected(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with RunLock.acquire(tmp_path) as lock:
        assert "No locks available" in lock.unsupported
        assert holder(tmp_path) is None


def test_local_run_refuses_a_folder_in_use_and_touches_nothing(tmp_path, capsys):
    run_dir = tmp_path / "tiny_cpu"
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text("the other run's spec\n")
    with RunLock.acquire(run_dir):
        for extra in (["--local"], ["--local", "--resume"], ["--local", "--processes"], ["--partition", "debug"]):
            assert main([str(TINY), "--output-dir", str(tmp_path), *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1, err
            assert err[0].startswith(
                f"rlhf-launch: {run_dir} is in use by the run of pid {os.getpid()} on {socket.gethostname()} (started "
            )
    assert (run_dir / "spec.yaml").read_text() == "the other run's spec\n"
    assert not (run_dir / "logs").exists() and not (run_dir / "job.sbatch").exists()


def test_rank_zero_holds_the_lock_for_the_run(tmp_path):
    from rlhf_launch.frontend.spec import load_spec
    from rlhf_launch.runtime.training_run import run

    spec = load_spec(TINY, ["train_config.max_train_step=1"]).spec
    with RunLock.acquire(tmp_path):
        with pytest.raises(RunLocked):
            run(spec, tmp_path, quiet=True)
    assert not (tmp_path / "status.json").exists()  # the status belongs to the run that holds the folder


def test_a_lock_handed_to_a_child_stays_held_by_it_until_it_ends(tmp_path):
    """As the --local launcher hands its lock to global rank 0: the folder is never free between them."""
    code = (
        "import sys\n"
        "from rlhf_launch.runtime.run_lock import RunLock, adopt_from_env\n"
        "adopt_from_env()\n"
        f"lock = RunLock.acquire({str(tmp_path)!r}, retry_s=0)\n"  # no retry: a hand-over takes no waiting
        "print('taken', lock.taken_over, flush=True)\n"
        "sys.stdin.readline()\n"
        "lock.release()\n"
    )
    lock = RunLock.acquire(tmp_path)
    env, fds = lock.child_handover()
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, pass_fds=fds,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "taken None"  # a hand-over is no take-over of a dead run
        assert holder(tmp_path).pid == child.pid
        lock.release()  # the launcher lets go first: the child's descriptor keeps the folder locked
        assert holder(tmp_path).pid == child.pid
        with pytest.raises(RunLocked, match=f"pid {child.pid} "):
            RunLock.acquire(tmp_path, retry_s=0.2)
    finally:
        child.communicate("\n", timeout=30)
    assert child.returncode == 0
    assert holder(tmp_path) is None
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == child.pid  # the run that took over is the one on record


def test_a_lock_offered_in_this_process_is_taken_over_once_and_withdrawn_after(tmp_path):
    with RunLock.acquire(tmp_path) as launcher:
        with launcher.offered():
            with RunLock.acquire(tmp_path, retry_s=0) as run:  # the one-process run: no deadlock on its own launcher
                assert run.taken_over is None and holder(tmp_path).pid == os.getpid()
                with pytest.raises(RunLocked):  # served once
                    RunLock.acquire(tmp_path, retry_s=0.2)
            assert holder(tmp_path) is not None  # the launcher still holds it
        with launcher.offered():
            pass  # not taken: withdrawn
        with pytest.raises(RunLocked):
            RunLock.acquire(tmp_path, retry_s=0.2)
    assert holder(tmp_path) is None


@pytest.mark.parametrize("processes", [False, True], ids=["one-process", "processes"])
@pytest.mark.parametrize("skip_early_check", [False, True], ids=["checked", "unchecked"])
def test_a_second_launch_while_the_first_starts_its_run_refuses_and_leaves_its_spec(
    tiny_models, tmp_path, monkeypatch, capsys, processes, skip_early_check
):
    """The first launcher holds the folder from before it writes spec.yaml until its run is over:
    a second launch in the window before its ranks take the lock over is refused, naming the first
    launcher, and does not rewrite spec.yaml (which the first run's ranks have yet to read)."""
    from rlhf_launch.frontend import cli
    from rlhf_launch.frontend.backends import local

    run_dir = tmp_path / "tiny_cpu"
    spec = run_dir / "spec.yaml"
    second: dict = {}

    def start_run(*args, lock=None, **kwargs):  # where the first launch's ranks would be importing torch
        assert holder(run_dir).pid == os.getpid()
        assert (lock is not None) == processes  # --processes hands the lock on to rank 0
        before = (spec.read_bytes(), spec.stat().st_mtime_ns)
        if skip_early_check:  # the lock itself, not only the launcher's early look, keeps it out
            monkeypatch.setattr(cli, "run_dir_in_use", lambda run_dir: None)
        capsys.readouterr()  # the first launch's start line
        second["status"] = main([str(TINY), "--output-dir", str(tmp_path), "--local", "--no-check",
                                 "--set", "train_config.max_train_step=7"])
        second["err"] = capsys.readouterr().err
        second["unchanged"] = before == (spec.read_bytes(), spec.stat().st_mtime_ns)
        return 0

    monkeypatch.setattr(local, "run_local_ranks" if processes else "run_in_process", start_run)
    first = ["--local", "--no-check"] + (["--processes"] if processes else [])
    assert main([str(TINY), "--output-dir", str(tmp_path), *first]) == 0
    assert second["status"] == 2
    line = f"rlhf-launch: {run_dir} is in use by the run of pid {os.getpid()} on {socket.gethostname()} (started "
    assert second["err"].startswith(line) and second["err"].count("\n") == 1, second["err"]
    assert second["unchanged"]
    assert "max_train_step: 7" not in spec.read_text()
    assert holder(run_dir) is None  # the first launcher let go when its run was over


def test_a_submission_holds_the_folder_only_while_it_writes_and_submits(tmp_path, monkeypatch):
    from rlhf_launch.frontend.backends import slurm_jobs

    run_dir = tmp_path / "tiny_cpu"
    held_by: list = []

    def sbatch(script, run_dir):
        held_by.append(holder(run_dir))
        return "1234"

    monkeypatch.setattr(slurm_jobs, "submit", sbatch)
    assert main([str(TINY), "--output-dir", str(tmp_path), "--partition", "debug", "--no-check"]) == 0
    assert held_by[0] is not None and held_by[0].pid == os.getpid()  # spec.yaml was written under the lock
    assert holder(run_dir) is None  # the job's rank 0 locks the folder when it starts
