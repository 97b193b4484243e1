"""Prepared datasets on disk: ``DIR/manifest.json`` + token shards (``.bin``) and their document ends (``.idx``).

Written by :mod:`parscale_jax.data.prepare`, read here. A shard is flat little-endian token ids of
the manifest's dtype (uint16 when the vocabulary fits, else uint32); every document is its
tokens followed by EOS. The ``.idx`` beside it holds little-endian uint64 cumulative end offsets
(in tokens, within the shard) of the documents that end in it. A split's stream is its shards
concatenated in manifest order. Opening reads only the manifest; a shard is opened (and its
size checked against the manifest) when first read, through a memory map, so only the pages a
read touches are loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
from typing import Any

import numpy as np

from parscale_jax.errors import UserError

FORMAT = "parscale-tokens"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
SPLIT_RULE = "sha256(key)[:8] as a fraction of 2^64 < heldout_fraction; key = unit key"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_SHARD_KEYS = ("file", "split", "tokens", "documents", "max_id", "bytes", "sha256", "doc_ends")


def dtype_for(vocab_size: int) -> str:
    """The shard dtype of a vocabulary: uint16 when every id fits, else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def fingerprint(tokenizer: dict, dtype: str, shards: list[dict]) -> str:
    """sha256 of the canonical JSON of ``[tokenizer, dtype, shards]`` (the dataset's identity)."""
    blob = json.dumps([tokenizer, dtype, shards], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def is_dataset(path: str) -> bool:
    """A directory holding a manifest.json (a prepared dataset; without one it is not a dataset)."""
    return os.path.isfile(os.path.join(path, MANIFEST))


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A prepared dataset's manifest (``data`` is the JSON as written) and the folder it lives in."""
    dir: str
    data: dict[str, Any]

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.data["dtype"]]

    @property
    def tokenizer(self) -> dict[str, Any]:
        return self.data["tokenizer"]

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer["eos_id"])

    @property
    def fingerprint(self) -> str:
        return self.data["fingerprint"]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.data["shards"]

    @property
    def max_id(self) -> int:
        """The largest token id of the dataset (-1 when it holds no tokens)."""
        return max((int(s["max_id"]) for s in self.shards), default=-1)

    def shards_of(self, split: str) -> list[dict[str, Any]]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [s for s in self.shards if s["split"] == split]

    def split_tokens(self, split: str) -> int:
        return sum(int(s["tokens"]) for s in self.shards_of(split))

    def split_documents(self, split: str) -> int:
        return sum(int(s["documents"]) for s in self.shards_of(split))


def read_manifest(path: str) -> Manifest:
    """The manifest of the prepared dataset in folder ``path`` (validated: format, version, fields)."""
    path = os.path.abspath(os.path.expanduser(path))
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise UserError(f"{path} is not a prepared dataset (no {MANIFEST}): run "
                        f"`python -m parscale_jax.data prepare --input SRC --out {path}` first")
    try:
        with open(mpath, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{mpath} is not readable JSON ({' '.join(str(e).split())[:200]}): "
                        f"prepare the dataset again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{mpath} is not a {FORMAT} manifest: point at a folder written by "
                        f"`python -m parscale_jax.data prepare`")
    version = data.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise UserError(f"{mpath} has format version {version!r}, newer than this parscale-jax reads ({VERSION}): "
                        f"upgrade parscale-jax or prepare the dataset with this version")
    problem = _manifest_problem(data)
    if problem:
        raise UserError(f"{mpath} is damaged ({problem}): prepare the dataset again")
    return Manifest(path, data)


def _manifest_problem(data: dict) -> str | None:
    for key in ("tokenizer", "dtype", "shards", "splits", "fingerprint", "heldout_fraction"):
        if key not in data:
            return f"no {key!r}"
    if data["dtype"] not in DTYPES:
        return f"unknown dtype {data['dtype']!r}"
    tok = data["tokenizer"]
    if not isinstance(tok, dict) or not all(k in tok for k in ("spec", "fingerprint", "vocab_size", "eos_id")):
        return "incomplete tokenizer record"
    if not isinstance(data["shards"], list):
        return "shards is not a list"
    for i, s in enumerate(data["shards"]):
        if not isinstance(s, dict) or any(k not in s for k in _SHARD_KEYS) or s["split"] not in SPLITS:
            return f"shard {i} is incomplete"
        if os.path.basename(str(s["file"])) != s["file"] or os.path.basename(str(s["doc_ends"])) != s["doc_ends"]:
            return f"shard {i} names a file outside the folder"
    return None


def check_shard_file(path: str, expected_bytes: int, what: str = "shard") -> None:
    """A UserError naming ``path`` when it is missing or its size differs from the manifest's."""
    try:
        size = os.path.getsize(path)
    except OSError:
        raise UserError(f"{what} {path} is missing: restore it or prepare the dataset again") from None
    if size != expected_bytes:
        raise UserError(f"{what} {path} has {size} bytes, the manifest says {expected_bytes} (truncated or "
                        f"replaced): restore it or prepare the dataset again")


class ShardStream:
    """One split of a prepared dataset as a 1-D token sequence (the shards concatenated in manifest order).

    ``len(stream)`` comes from the manifest; ``read(start, stop)`` returns tokens [start, stop) as
    int32, memory-mapping only the shards it touches (a shard's size is checked when it is first
    opened). Pickles by path: a worker process reopens the files instead of receiving a copy.
    """

    def __init__(self, folder: str, dtype: np.dtype, shards: list[dict[str, Any]]):
        self.folder, self.dtype = folder, np.dtype(dtype)
        self.shards = [dict(s) for s in shards if int(s["tokens"])]
        self.starts = np.cumsum([0] + [int(s["tokens"]) for s in self.shards]).astype(np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {"folder": self.folder, "dtype": self.dtype.str, "shards": self.shards, "starts": self.starts}

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.dtype = np.dtype(d["dtype"])
        self._maps = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard(self, i: int) -> np.ndarray:
        """Shard ``i``'s tokens as a read-only memory map (size checked against the manifest)."""
        m = self._maps.get(i)
        if m is None:
            s = self.shards[i]
            path = os.path.join(self.folder, s["file"])
            check_shard_file(path, int(s["bytes"]))
            m = self._maps[i] = np.memmap(path, dtype=self.dtype, mode="r", shape=(int(s["tokens"]),))
            mm = getattr(m, "_mmap", None)  # records are read at random: no read-ahead around each page
            if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
                mm.madvise(mmap.MADV_RANDOM)
        return m

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int32 (clipped to the stream)."""
        start, stop = max(int(start), 0), min(int(stop), len(self))
        if start >= stop:
            return np.zeros((0,), np.int32)
        out = np.empty((stop - start,), np.int32)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            lo, hi = int(self.starts[i]), int(self.starts[i + 1])
            take = min(stop, hi) - pos
            out[pos - start: pos - start + take] = self.shard(i)[pos - lo: pos - lo + take]
            pos += take
            i += 1
        return out


def open_split(folder: str, manifest: Manifest, split: str) -> ShardStream:
    """The ``split`` ("train" or "heldout") of the dataset in ``folder`` as a :class:`ShardStream`."""
    return ShardStream(os.path.abspath(folder), manifest.dtype, manifest.shards_of(split))


def doc_ends(folder: str, shard: dict[str, Any]) -> np.ndarray:
    """The shard's document end offsets (uint64, within the shard), from its ``.idx`` file."""
    path = os.path.join(folder, shard["doc_ends"])
    check_shard_file(path, 8 * int(shard["documents"]), "document index")
    return np.fromfile(path, dtype="<u8")


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def verify(manifest: Manifest) -> None:
    """Every shard and index present with the manifest's size, every shard's sha256 as recorded."""
    for s in manifest.shards:
        path = os.path.join(manifest.dir, s["file"])
        check_shard_file(path, int(s["bytes"]))
        check_shard_file(os.path.join(manifest.dir, s["doc_ends"]), 8 * int(s["documents"]), "document index")
        digest = sha256_file(path)
        if digest != s["sha256"]:
            raise UserError(f"shard {path} has sha256 {digest[:16]}..., the manifest says {s['sha256'][:16]}... "
                            f"(the file changed): restore it or prepare the dataset again")


def summary(manifest: Manifest) -> dict[str, Any]:
    """Tokens, documents, shards and split sizes (what ``inspect DIR`` prints)."""
    d = manifest.data
    return {"dir": manifest.dir, "format": f"{d['format']} v{d['version']}", "tokenizer": d["tokenizer"]["spec"],
            "vocab_size": manifest.vocab_size, "dtype": d["dtype"], "max_id": manifest.max_id,
            "tokens": sum(int(s["tokens"]) for s in manifest.shards),
            "documents": sum(int(s["documents"]) for s in manifest.shards),
            "shards": len(manifest.shards), "bytes": sum(int(s["bytes"]) for s in manifest.shards),
            "heldout_fraction": d["heldout_fraction"],
            "splits": {sp: {"tokens": manifest.split_tokens(sp), "documents": manifest.split_documents(sp),
                            "shards": len(manifest.shards_of(sp))} for sp in SPLITS},
            "fingerprint": manifest.fingerprint}


# ---- writing (used by prepare) ----------------------------------------------------------------
def write_all(f, buf: memoryview) -> None:
    """Write all of ``buf`` to an unbuffered file (``write`` may write less than asked)."""
    while len(buf):
        buf = buf[f.write(buf):]


def copy_range(src_fd: int, dst_fd: int, offset: int, n: int) -> None:
    """Copy ``n`` bytes of ``src_fd`` from ``offset`` to the end of ``dst_fd``, in the kernel."""
    while n > 0:
        done = os.copy_file_range(src_fd, dst_fd, n, offset)
        if done <= 0:
            raise OSError(f"copy_file_range copied nothing at offset {offset}")
        offset, n = offset + done, n - done
