"""The lock of a run folder: one run trains in a folder at a time.

Global rank 0 holds an exclusive ``flock`` on ``RUN_DIR/.lock`` for the whole run and writes its
pid, host and start time into the file, for the message another run gets. The kernel drops a
flock when the last descriptor of the holding process closes, so the lock of a process that died
(SIGKILL, OOM killer) is free again at once and the next run takes it over. On NFS, Linux
emulates flock with whole-file POSIX locks, which other clients see too (a lost node's lock goes
when the server's lease on it ends). Where the file system has no locks at all, the run goes on
without one, saying so.

The launcher takes the lock before it writes RUN_DIR/spec.yaml and hands it on, so that the folder
is never free between that write and the run: to the run in its own process (``RunLock.offered``),
or to global rank 0 of a ``--local`` run in processes, which inherits a descriptor of the lock
(``RunLock.child_handover``, ``adopt_from_env``). A Slurm submission holds it only while it writes
and submits: the job starts later, and its rank 0 locks the folder then.
Imports nothing heavy (no torch): the launcher uses it on login nodes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = ".lock"
# The launcher's check (or a Slurm submission) holds the lock for a moment; a run starting then retries.
ACQUIRE_RETRY_S = 2.0
# Set by ``rlhf-launch --local`` in global rank 0's environment: the number of an inherited
# descriptor of the launcher's lock, which rank 0 takes over (``adopt_from_env``).
HANDOVER_FD_ENV = "RLHF_RUN_LOCK_FD"

# Locks handed to the next ``acquire`` of their folder in this process, by the lock file's
# (st_dev, st_ino): each a descriptor of the holder's open file, so it shares the holder's flock.
_offers: dict[tuple[int, int], int] = {}


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


def _read_record(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        data = {}
    return data if isinstance(data, dict) else {}


def _read_holder(fd: int) -> Holder:
    data = _read_record(fd)
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


def _file_key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _claim_offer(fd: int) -> int | None:
    """The descriptor handed over for the lock file open as ``fd``, if any (taken: it serves once)."""
    try:
        return _offers.pop(_file_key(fd), None)
    except OSError:
        return None


def adopt_from_env(env=os.environ) -> None:
    """In a rank the ``--local`` launcher started: keep the descriptor of the launcher's lock it
    passed (global rank 0 only) for this process's ``RunLock.acquire`` to take over. The variable is
    removed and the descriptor made not inheritable: processes this rank starts must not hold the lock."""
    value = env.pop(HANDOVER_FD_ENV, None)
    if value is None:
        return
    try:
        fd = int(value)
        os.set_inheritable(fd, False)
        _offers[_file_key(fd)] = fd
    except (ValueError, OSError):
        pass  # no such descriptor here: this rank locks the folder itself, as on Slurm


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
    def acquire(cls, run_dir: str | os.PathLike, retry_s: float = ACQUIRE_RETRY_S, take_handover: bool = True) -> RunLock:
        """Lock ``run_dir`` for this process, or raise RunLocked naming the process that holds it.

        With ``take_handover`` (a run's rank 0), a lock the launcher handed over (``offered``,
        ``adopt_from_env``) is taken over as it is: it is held already, by the open file whose
        descriptor was handed over. A launcher passes False: it never continues another's lock."""
        run_dir = Path(run_dir)
        fd = os.open(lock_path(run_dir), os.O_RDWR | os.O_CREAT, 0o644)
        handed = _claim_offer(fd) if take_handover else None
        if handed is not None:
            os.close(fd)
            fd = handed
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
        # The launcher's record in a lock handed over is no run that died.
        died = handed is None and previous.pid is not None and not previous.released
        lock = cls(run_dir, fd, previous if died else None)
        lock._record = record
        return lock

    @contextlib.contextmanager
    def offered(self):
        """Hand this lock to the next ``acquire`` of its folder in this process (the launcher's
        one-process run) while in the block; an offer not taken is withdrawn at its end. The folder
        stays locked until both this lock and the one taken from it are released."""
        if self._fd is None:  # nothing held, nothing to hand over
            yield
            return
        fd = os.dup(self._fd)  # the same open file, hence the same flock
        key = _file_key(fd)
        _offers[key] = fd
        try:
            yield
        finally:
            if _offers.get(key) == fd:
                del _offers[key]
                os.close(fd)

    def child_handover(self) -> tuple[dict[str, str], tuple[int, ...]]:
        """The environment variable and the descriptor (for ``subprocess.Popen``'s ``pass_fds``) that
        pass this lock on to a child process, whose ``RunLock.acquire`` takes it over after
        ``adopt_from_env``; none when nothing is held. The child's inherited descriptor keeps the
        folder locked while the child lives, whatever becomes of this process."""
        if self._fd is None:
            return {}, ()
        return {HANDOVER_FD_ENV: str(self._fd)}, (self._fd,)

    def release(self) -> None:
        """Unlock. The file stays, marked released: it tells who ran last, and a later run reuses it.
        A lock that was handed over leaves the file as the run that took it over wrote it."""
        if self._fd is not None:
            try:
                if _read_record(self._fd) == self._record:
                    _write(self._fd, {**self._record, "released": time.time()})
            except OSError:
                pass  # a full disk must not keep the lock: closing below drops it anyway
            os.close(self._fd)  # drops the flock, unless a run this lock was handed to still holds it
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
