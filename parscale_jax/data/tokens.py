"""Helpers shared by the writer and the reader of prepared datasets: ``.npy`` token-id files and
the cache folder (``$PARSCALE_JAX_CACHE``, default ``~/.cache/parscale_jax``) where raw sources
are prepared once (:mod:`.records`). Corpora are never held in memory: they are prepared into
token shards (:mod:`.prepare`) and read record by record (:mod:`.shards`, :mod:`.records`).
"""
from __future__ import annotations

import os

import numpy as np

from parscale_jax.errors import UserError


def _open_npy(path: str) -> np.ndarray:
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        msg = " ".join(str(e).split())[:200]
        raise UserError(f"{path}: not a readable .npy array of token ids ({msg}): save it with "
                        f"np.save(path, ids.astype(np.int32))") from None
    if not np.issubdtype(a.dtype, np.integer):
        raise UserError(f"{path}: wrong npy dtype {a.dtype}, expected integer token ids: save it with "
                        f"np.save(path, ids.astype(np.int32))")
    return a.reshape(-1)


def npy_raw_offset(path: str, dtype: np.dtype) -> int | None:
    """The byte offset of a .npy file's data when its bytes are already the shard's (same dtype, C
    order): then they are copied by the kernel, not through Python. None otherwise (cast in chunks)."""
    try:
        with open(path, "rb") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, src_dtype = read(fh)
            offset = fh.tell()
    except (OSError, ValueError):
        return None
    same = np.dtype(src_dtype) == dtype and (not fortran or len(shape) <= 1)
    return offset if same else None


def cache_dir() -> str | None:
    """Where tokenised text is cached ($PARSCALE_JAX_CACHE, default ~/.cache/parscale_jax; 'off' disables)."""
    d = os.environ.get("PARSCALE_JAX_CACHE")
    if d is not None:
        return None if d.strip().lower() in ("", "off", "none", "0") else os.path.expanduser(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "parscale_jax")
