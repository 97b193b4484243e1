"""Token streams: documents -> token ids (cached for slow tokenizers) -> one stream per split.

Within a split the units are taken in relative-path order; every non-empty document is
tokenised and followed by EOS; ``.npy`` files stay memory-mapped. Tokenising with a Hugging
Face tokenizer is cached in ``$PARSCALE_JAX_CACHE`` (default ``~/.cache/parscale_jax``),
keyed by the tokenizer and the exact text.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
from typing import Sequence

import numpy as np
from tqdm import tqdm

from parscale_jax.data.config import DataConfig
from parscale_jax.data.sources import _Unit, _units, split_units
from parscale_jax.data.tokenizer import ByteTokenizer, Tokenizer, _utf8, _valid_str, encode_documents
from parscale_jax.errors import UserError
from parscale_jax.fileio import atomic_file


class _Array:
    """An in-memory segment of token ids."""

    def __init__(self, a: np.ndarray):
        self.a = a

    def __len__(self) -> int:
        return len(self.a)

    def read(self, lo: int, hi: int) -> np.ndarray:
        return self.a[lo:hi]

    def sub(self, lo: int, hi: int) -> "_Array":
        return _Array(self.a[lo:hi])


class _Npy:
    """A (sliced) pre-tokenised .npy file read through a memory map: only touched pages are read.
    Pickles by path (grain workers reopen it instead of receiving a copy)."""

    def __init__(self, path: str, lo: int = 0, hi: int | None = None):
        self.path, self.lo = path, lo
        self.hi = len(self._arr()) if hi is None else hi

    def _arr(self) -> np.ndarray:
        a = getattr(self, "_a", None)
        if a is None:
            a = self._a = _open_npy(self.path)
        return a

    def __getstate__(self):
        return {"path": self.path, "lo": self.lo, "hi": self.hi}

    def __setstate__(self, d):
        self.__dict__.update(d)

    def __len__(self) -> int:
        return self.hi - self.lo

    def read(self, lo: int, hi: int) -> np.ndarray:
        return np.asarray(self._arr()[self.lo + lo: self.lo + hi])

    def sub(self, lo: int, hi: int) -> "_Npy":
        return _Npy(self.path, self.lo + lo, self.lo + hi)


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


class TokenStream:
    """A 1-D token sequence made of consecutive segments (arrays or .npy memory maps)."""

    def __init__(self, segments: Sequence[_Array | _Npy]):
        self.segments = [s for s in segments if len(s)]
        self.starts = np.cumsum([0] + [len(s) for s in self.segments]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Tokens [lo, hi) as int32."""
        lo, hi = max(lo, 0), min(hi, len(self))
        pieces = []
        i = int(np.searchsorted(self.starts, lo, side="right")) - 1
        while lo < hi:
            seg_lo = int(self.starts[i])
            take = min(hi, int(self.starts[i + 1])) - lo
            pieces.append(self.segments[i].read(lo - seg_lo, lo - seg_lo + take))
            lo += take
            i += 1
        if not pieces:
            return np.zeros((0,), np.int32)
        return np.concatenate(pieces).astype(np.int32, copy=False)

    def slice(self, lo: int, hi: int) -> "TokenStream":
        segs = []
        for s, a, b in zip(self.segments, self.starts[:-1], self.starts[1:]):
            a, b = int(a), int(b)
            x, y = max(lo, a), min(hi, b)
            if x < y:
                segs.append(s.sub(x - a, y - a))
        return TokenStream(segs)

    def rows(self, index: np.ndarray, width: int) -> np.ndarray:
        """Records ``index`` of width ``width`` (record i = tokens [i*width, (i+1)*width)), int32."""
        index = np.asarray(index, dtype=np.int64)
        if len(self.segments) == 1 and isinstance(self.segments[0], _Array):
            a = self.segments[0].a
            return a[index[:, None] * width + np.arange(width)].astype(np.int32)
        out = np.empty((len(index), width), np.int32)
        for r, i in enumerate(index):
            out[r] = self.read(int(i) * width, (int(i) + 1) * width)
        return out


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.int32


def cache_dir() -> str | None:
    """Where tokenised text is cached ($PARSCALE_JAX_CACHE, default ~/.cache/parscale_jax; 'off' disables)."""
    d = os.environ.get("PARSCALE_JAX_CACHE")
    if d is not None:
        return None if d.strip().lower() in ("", "off", "none", "0") else os.path.expanduser(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "parscale_jax")


def _read_doc(u: _Unit) -> bytes | str:
    if u.text is not None:
        return u.text
    try:
        with open(u.file.path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise UserError(f"cannot read data file {u.file.path} ({e.strerror}): check the path and permissions") from None


def _encode_group(docs: list[bytes | str], tok: Tokenizer, dtype) -> np.ndarray:
    """Token ids of the documents, each followed by EOS, as one array."""
    if isinstance(tok, ByteTokenizer):
        return encode_documents(tok, docs, dtype)[0]

    texts = [_valid_str(d) if isinstance(d, str) else d.decode("utf-8", errors="replace") for d in docs]
    key = hashlib.sha256(tok.fingerprint.encode())
    for t in texts:
        b = t.encode("utf-8")
        key.update(len(b).to_bytes(8, "little"))
        key.update(b)
    folder = cache_dir()
    cache = os.path.join(folder, f"tokens-{key.hexdigest()[:40]}.npy") if folder else None
    if cache and os.path.isfile(cache):
        try:
            return np.load(cache, allow_pickle=False).astype(dtype, copy=False)
        except (ValueError, OSError, EOFError):
            pass  # a damaged cache entry: re-tokenise and overwrite it

    n_bytes = sum(len(t) for t in texts)
    chunk, parts = 256, []
    with tqdm(total=len(texts), desc=f"tokenising {n_bytes / 2**20:.0f} MiB", unit="doc", file=sys.stderr,
              mininterval=2.0, disable=n_bytes <= 4 << 20) as progress:
        for i in range(0, len(texts), chunk):
            parts.append(encode_documents(tok, texts[i: i + chunk], dtype)[0])
            progress.update(len(texts[i: i + chunk]))
    out = np.concatenate(parts) if parts else np.zeros((0,), dtype)
    if cache:
        try:  # caching is an optimisation only
            with atomic_file(cache, "wb") as f:
                np.save(f, out)
        except OSError:
            pass
    return out


def _doc_bytes(d: bytes | str) -> int:
    return len(d) if isinstance(d, (bytes, bytearray)) else len(_utf8(d))


def _check_ids(seg: "_Npy", tok: Tokenizer, vocab_size: int | None = None, chunk: int = 1 << 24) -> None:
    """Every id of a .npy file in [0, limit): read once, in chunks, when the stream is built (a bad id
    would otherwise index past the embedding silently, or fail hours into a run). The limit is
    ``vocab_size`` when given (a model's vocabulary: evaluation), else the tokenizer's (training)."""
    limit = vocab_size or tok.vocab_size
    for lo in range(0, len(seg), chunk):
        a = seg.read(lo, lo + chunk)
        lo_id, hi_id = int(a.min()), int(a.max())
        if lo_id < 0 or hi_id >= limit:
            bad = hi_id if hi_id >= limit else lo_id
            if vocab_size:
                raise UserError(f"{seg.path}: token id {bad} is outside the model's vocabulary [0, {limit}): "
                                f"these ids were made for another model")
            raise UserError(f"{seg.path}: token id {bad} is outside the tokenizer's vocabulary [0, {limit}) "
                            f"(data.tokenizer={tok.name}): set data.tokenizer to the tokenizer that made these ids")


def _stream(units: Sequence[_Unit], tok: Tokenizer, with_bytes: bool = False,
            vocab_size: int | None = None) -> tuple[TokenStream, int, int]:
    """(stream of the units in order, every document followed by EOS; source bytes; documents).

    Empty documents are skipped. Text is tokenised in one go per run of text units; .npy files
    stay memory-mapped (their ids are used as they are, EOS after each file). ``with_bytes``
    counts the text bytes of .npy ids through the tokenizer (reads them); text units always
    count their source bytes (tokenizer-independent, for bits per byte).
    """
    dtype = _token_dtype(max(tok.vocab_size, vocab_size or 0))
    eos = _Array(np.asarray([tok.eos_id], dtype))
    segs: list[_Array | _Npy] = []
    pending: list[bytes | str] = []
    n_bytes = n_docs = 0

    def flush():
        if pending:
            segs.append(_Array(_encode_group(pending, tok, dtype)))
            pending.clear()

    for u in units:
        if u.file.format == "npy":
            flush()
            seg = _Npy(u.file.path)
            _check_ids(seg, tok, vocab_size)
            if len(seg):
                segs += [seg, eos]
                n_docs += 1
                if with_bytes:
                    n_bytes += tok.count_bytes(seg.read(0, len(seg)))
            continue
        doc = _read_doc(u)
        if len(doc):
            pending.append(doc)
            n_bytes += _doc_bytes(doc)
            n_docs += 1
    flush()
    return TokenStream(segs), n_bytes, n_docs


def _split_streams(cfg: DataConfig, tok: Tokenizer, which: str, with_bytes: bool = False,
                   vocab_size: int | None = None) -> tuple[TokenStream, int, int, int]:
    """(stream, bytes, documents, units) of ``which`` in {"train", "heldout"}. Bytes of text units
    are always counted; bytes of .npy ids (and of a token-level split) only ``with_bytes``."""
    s = split_units(cfg)
    if not s.by_tokens:
        units = s.train if which == "train" else s.heldout
        stream, n_bytes, n_docs = _stream(units, tok, with_bytes=with_bytes, vocab_size=vocab_size)
        return stream, n_bytes, n_docs, len(units)
    full, _, n_docs = _stream(s.train, tok, vocab_size=vocab_size)
    n = len(full)
    n_held = min(n, max(1, math.ceil(cfg.heldout_fraction * n)))
    part = full.slice(0, n - n_held) if which == "train" else full.slice(n - n_held, n)
    n_bytes = tok.count_bytes(part.read(0, len(part))) if with_bytes else 0
    return part, n_bytes, n_docs, len(s.train)


def heldout_tokens(cfg: DataConfig, tokenizer: Tokenizer, vocab_size: int | None = None) -> tuple[np.ndarray, int]:
    """(1-D int32 held-out token stream, documents in relative-path order each followed by EOS;
    number of UTF-8 bytes of text it encodes). Bits per byte over the whole stream:
    ``bpb = loss_nats * n_targets / (ln 2 * n_bytes)``; when only part of the stream is scored,
    count that part's bytes with ``tokenizer.count_bytes(scored_ids)``. ``vocab_size``: check
    ``.npy`` ids against a model's vocabulary instead of the tokenizer's."""
    if cfg.heldout_fraction <= 0:
        raise UserError("data.heldout_fraction is 0, so there is no held-out data: set it above 0 "
                        "(e.g. 0.05) or evaluate on another source")
    stream, n_bytes, _, _ = _split_streams(cfg, tokenizer, "heldout", with_bytes=True, vocab_size=vocab_size)
    if len(stream) == 0:
        raise UserError(f"the held-out split of {cfg.source} is empty: add data or raise data.heldout_fraction")
    return stream.read(0, len(stream)), int(n_bytes)


def all_tokens(cfg: DataConfig, tokenizer: Tokenizer, vocab_size: int | None = None) -> tuple[np.ndarray, int]:
    """Like :func:`heldout_tokens` for every unit of the source, whatever the split: (1-D int32
    stream of all documents in relative-path order, each followed by EOS; text bytes it encodes)."""
    stream, n_bytes, _ = _stream(_units(cfg), tokenizer, with_bytes=True, vocab_size=vocab_size)
    if len(stream) == 0:
        raise UserError(f"data source {cfg.source} holds no text or token ids: add data or point to another source")
    return stream.read(0, len(stream)), int(n_bytes)


