"""Atomic writes: a file or a directory appears whole at its final path, or not at all.

Everything this project writes outside orbax's own checkpoint manager goes through here:
results JSON, config.yaml, the token cache, task files, saved models and Hugging Face exports.
The data is written to a unique temporary sibling (same filesystem), then renamed into place
with ``os.replace``; on any error the temporary is removed and the destination is untouched.

A full disk (or quota) is one line, not a traceback: :func:`no_space` turns the ``OSError`` into
a :class:`~parscale_jax.errors.RunFailed` naming the path and the free space; the writers here
raise it themselves, and the training loop applies it to whatever else hits the limit.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import uuid
from typing import IO, Any, Iterator

from parscale_jax.errors import RunFailed, UserError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


# ---- space -----------------------------------------------------------------------------------
def free_bytes(path: str) -> int | None:
    """Free bytes on the filesystem of ``path`` (its nearest existing ancestor); None if unknown."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def tree_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (0 if it is gone)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(dirpath, f))
    return total


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def is_no_space(exc: BaseException) -> bool:
    """An OSError of a full disk or quota, also when wrapped (``raise ... from``) by a library."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def no_space(path: str, exc: BaseException | None = None, what: str = "writing") -> RunFailed:
    """The one-line error of a full disk at ``path``."""
    why = f" ({type(exc).__name__}: {_first_line(exc)})" if exc is not None else ""
    return RunFailed(f"no space left {what} {path}{why}; {fmt_bytes(free_bytes(path))} free there: "
                     f"free space (or choose another directory), then run the same command again")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _tmp_sibling(path: str) -> str:
    """A unique name beside ``path`` (unique across processes and hosts sharing the folder)."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", **open_kw: Any) -> Iterator[IO]:
    """``with atomic_file(p) as f: f.write(...)``: ``p`` is replaced only when the block succeeds."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if is_no_space(e):
            raise no_space(path, e) from None
        raise


def write_text(path: str, text: str) -> str:
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def write_json(path: str, obj: Any, indent: int | None = 2) -> str:
    with atomic_file(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
    return path


@contextlib.contextmanager
def atomic_dir(path: str, replace: bool = False) -> Iterator[str]:
    """``with atomic_dir(out) as tmp: <write files under tmp>``: ``out`` appears complete at the end.

    ``replace=False``: an existing ``out`` is a UserError (nothing is overwritten).
    ``replace=True``: an existing ``out`` is swapped for the new one (renamed aside, then removed),
    so a reader sees the old or the new directory, never a mixture.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not replace:
        raise UserError(f"{path} already exists: choose a new output directory or remove it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-", dir=parent)
    try:
        try:
            yield tmp
        except OSError as e:
            if is_no_space(e):
                raise no_space(path, e) from None
            raise
        if os.path.exists(path):
            old = _tmp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
