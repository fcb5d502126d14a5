"""The run-folder lock: a live run keeps others out, naming itself; a dead run's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from launcher.cli import main
from rlhf.run_lock import LOCK_FILE, RunLock, RunLocked, holder
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
        "from rlhf.run_lock import RunLock\n"
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
    from launcher.spec import load_spec
    from rlhf.loop import run

    spec = load_spec(TINY, ["train_config.max_train_step=1"]).spec
    with RunLock.acquire(tmp_path):
        with pytest.raises(RunLocked):
            run(spec, tmp_path, quiet=True)
    assert not (tmp_path / "status.json").exists()  # the status belongs to the run that holds the folder
