"""One run per workdir: a lock file naming its holder (host, pid, start time).

``WORKDIR/train.lock`` holds one JSON line ``{"host", "pid", "started", "boot", "proc_start"}`` and
is ``flock``-ed by the holder for as long as it runs. A second run finds the lock held and stops
with one line naming the holder. The file is removed on every exit path the process lives
through (success, error, signal); after a kill -9 the kernel drops the ``flock`` and the file
stays behind: the next run on the same host sees that its process is gone (or that the pid now
belongs to another process) and takes the lock over with a warning. A lock written on another
host is never taken over (its process cannot be checked from here): the message says to remove
the file once that run is known to be gone.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time

from parscale_jax.errors import UserError

LOCK_NAME = "train.lock"


def _boot_id() -> str | None:
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    return None


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (clock ticks since boot): tells a reused pid apart."""
    with contextlib.suppress(OSError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    return None


def _alive(holder: dict) -> bool:
    """Whether the process a lock of this host names is still the one that wrote it."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if holder.get("boot") and holder.get("boot") != _boot_id():
        return False  # written before the last reboot
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    start = _proc_start(pid)
    return start is None or holder.get("proc_start") in (None, start)


def _describe(holder: dict, path: str) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {when}; lock file {path})"


class WorkdirLock:
    """``with WorkdirLock(workdir): ...`` (or :meth:`acquire` / :meth:`release`)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self._fd: int | None = None

    def _read(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096).decode("utf-8", "replace").strip()
        try:
            holder = json.loads(raw) if raw else {}
        except ValueError:
            holder = {"unreadable": raw[:80]}
        return holder if isinstance(holder, dict) else {}

    def _held_by_other(self, fd: int) -> None:
        holder = self._read(fd)
        os.close(fd)
        raise UserError(f"workdir {os.path.dirname(self.path)} is in use by another training run, "
                        f"{_describe(holder, self.path)}: wait for it to finish, or use another --workdir")

    def acquire(self) -> "WorkdirLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._held_by_other(fd)
            try:  # the file we locked must still be the one at the path (its holder may have just removed it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = self._read(fd)
        if old:
            self._take_over(fd, old)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": round(time.time(), 3),
              "boot": _boot_id(), "proc_start": _proc_start(os.getpid())}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def _take_over(self, fd: int, old: dict) -> None:
        """A lock file left behind (we hold its flock, so its writer holds none)."""
        if old.get("host") != socket.gethostname() and "unreadable" not in old:
            os.close(fd)
            raise UserError(f"workdir {os.path.dirname(self.path)} is locked by a run on another host, "
                            f"{_describe(old, self.path)}: if that run is over, remove {self.path}; "
                            f"else wait for it or use another --workdir")
        if "unreadable" not in old and _alive(old):  # a live holder without a flock (a filesystem without locks)
            self._held_by_other(fd)
        print(f"warning: took over the stale lock of {_describe(old, self.path)}: that process is gone",
              file=sys.stderr, flush=True)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)  # removed while still locked: a waiting opener re-checks the inode
        os.close(fd)

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
