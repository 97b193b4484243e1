"""Atomic writes: a file or a directory appears whole at its final path, or not at all.

Everything this project writes outside orbax's own checkpoint manager goes through here:
results JSON, config.yaml, the token cache, task files, saved models and Hugging Face exports.
The data is written to a unique temporary sibling (same filesystem), then renamed into place
with ``os.replace``; on any error the temporary is removed and the destination is untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from typing import IO, Any, Iterator

from parscale_jax.errors import UserError


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
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
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
        yield tmp
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
