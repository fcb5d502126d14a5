"""The lock of a run folder: one run trains in a folder at a time.

Global rank 0 holds an exclusive ``flock`` on ``RUN_DIR/.lock`` for the whole run and writes its
pid, host and start time into the file, for the message another run gets. The kernel drops a
flock when the last descriptor of the holding process closes, so the lock of a process that died
(SIGKILL, OOM killer) is free again at once and the next run takes it over. On NFS, Linux
emulates flock with whole-file POSIX locks, which other clients see too (a lost node's lock goes
when the server's lease on it ends). Where the file system has no locks at all, the run goes on
without one, saying so.

The launcher only checks (``holder``) without keeping the lock: the run it starts takes it.
Imports nothing heavy (no torch): the launcher uses it on login nodes.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = ".lock"
# The launcher's check holds the lock for a moment; a run starting at that instant retries.
ACQUIRE_RETRY_S = 2.0


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a run folder's lock, as written in the lock file."""

    pid: int | None
    host: str | None
    started: float | None
    released: bool = False

    def describe(self) -> str:
        """'pid 123 on node1 (started 2024-05-01 10:00:00)', with '?' for what is unknown."""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)) if self.started else "?"
        return f"pid {self.pid if self.pid is not None else '?'} on {self.host or '?'} (started {when})"


class RunLocked(RuntimeError):
    """The run folder is locked by another run."""

    def __init__(self, run_dir: Path, holder: Holder):
        self.run_dir, self.holder = Path(run_dir), holder
        super().__init__(f"{run_dir} is in use by the run of {holder.describe()}")


def lock_path(run_dir: str | os.PathLike) -> Path:
    """The lock file of a run folder."""
    return Path(run_dir) / LOCK_FILE


def _read_holder(fd: int) -> Holder:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    pid, started = data.get("pid"), data.get("started")
    return Holder(
        pid if isinstance(pid, int) else None,
        data.get("host") if isinstance(data.get("host"), str) else None,
        float(started) if isinstance(started, (int, float)) else None,
        bool(data.get("released")),
    )


def _write(fd: int, record: dict) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)


def _try_flock(fd: int) -> bool:
    """Take the lock if it is free; raises OSError where the file system has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def holder(run_dir: str | os.PathLike) -> Holder | None:
    """The live holder of the run folder's lock, or None when it is free (no lock file, or one left
    by a process that is gone). Takes the lock for a moment to tell, and never creates the file."""
    try:
        fd = os.open(lock_path(run_dir), os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):  # no run folder (yet), or a file in its place
        return None
    try:
        if _try_flock(fd):
            return None  # closing the descriptor below releases it
        return _read_holder(fd)
    except OSError:
        return None  # no locks on this file system: nothing to tell
    finally:
        os.close(fd)


class RunLock:
    """The lock of one run folder, held by this process until ``release`` (or its death)."""

    def __init__(self, run_dir: str | os.PathLike, fd: int | None, previous: Holder | None, unsupported: str | None = None):
        self.run_dir, self._fd = Path(run_dir), fd
        self._record: dict = {}
        # The holder recorded in the file before we took it: a run that died without releasing.
        self.taken_over = previous
        # Why the folder could not be locked (a file system without flock, such as Lustre mounted
        # without -o flock): the run goes on unprotected rather than not at all.
        self.unsupported = unsupported

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike, retry_s: float = ACQUIRE_RETRY_S) -> RunLock:
        """Lock ``run_dir`` for this process, or raise RunLocked naming the process that holds it."""
        run_dir = Path(run_dir)
        fd = os.open(lock_path(run_dir), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + retry_s
            while not _try_flock(fd):
                if time.monotonic() >= deadline:
                    raise RunLocked(run_dir, _read_holder(fd))
                time.sleep(0.1)
        except OSError as exc:
            os.close(fd)
            return cls(run_dir, None, None, unsupported=f"{type(exc).__name__}: {exc}")
        except BaseException:
            os.close(fd)
            raise
        try:
            previous = _read_holder(fd)
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            _write(fd, record)
        except BaseException:
            os.close(fd)
            raise
        lock = cls(run_dir, fd, previous if previous.pid is not None and not previous.released else None)
        lock._record = record
        return lock

    def release(self) -> None:
        """Unlock. The file stays, marked released: it tells who ran last, and a later run reuses it."""
        if self._fd is not None:
            try:
                _write(self._fd, {**self._record, "released": time.time()})
            except OSError:
                pass  # a full disk must not keep the lock: closing below drops it anyway
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
