"""Training data: sources, tokenizers, train/held-out split, packing and a checkpointable grain iterator.

Flow, one way::

    DataConfig -> files -> split units (hash of the relative path) -> documents -> token ids
      -> one stream per split, every document followed by EOS -> records of seq_len + 1 tokens
      -> grain: global shuffle per epoch (seed), repeat, global batches -> this process's rows

Sources: the running interpreter's standard library (``source="stdlib"``, the default, needs
no download), a file, a directory, or a glob of text files, JSONL files (one JSON object per
line with a text field) and ``.npy`` arrays of token ids. Tokenizers: raw bytes (default) or a
local Hugging Face ``tokenizer.json``.

The iterator state is the index of the next global batch (plus what it depends on), so it is
a small JSON dict that survives a change of process count, worker count or prefetch depth.
This module does not import jax.
"""
from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import json
import math
import numbers
import os
import re
import sys
import sysconfig
import uuid
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from parscale_jax.errors import UserError

FORMATS = ("auto", "text", "jsonl", "npy")
STDLIB_EXCLUDE_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_STATE_VERSION = 1


# ---- config ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"      # "stdlib": the running interpreter's standard-library *.py sources; else a path or glob
    format: str = "auto"        # auto | text | jsonl | npy   (auto: by extension; .npy = pre-tokenised int token ids)
    text_field: str = "text"    # JSONL field
    tokenizer: str = "bytes"    # "bytes" (id = byte value; PAD=256, BOS=257, EOS=258) or a path to a HF tokenizer.json
    seq_len: int = 256          # training sequence length (examples are seq_len + 1 tokens: inputs + shifted targets)
    heldout_fraction: float = 0.05  # of split units (files; JSONL records), by hashing their key; 1 = all held out
    seed: int = 0               # global shuffle seed
    worker_count: int = 0       # grain workers (0 = in-process)
    prefetch: int = 2           # batches prefetched in a background thread

    def __post_init__(self):
        def bad(key, why):
            raise UserError(f"data.{key}={getattr(self, key)!r} is invalid: {why}")

        if not isinstance(self.source, str) or not self.source:
            bad("source", "give 'stdlib' or a file, directory or glob")
        if self.format not in FORMATS:
            bad("format", f"use one of {', '.join(FORMATS)}")
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            bad("seq_len", "use a positive integer")
        if not isinstance(self.heldout_fraction, (int, float)) or not 0.0 <= self.heldout_fraction <= 1.0:
            bad("heldout_fraction", "use a fraction in [0, 1] (1 holds everything out: evaluation only)")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            bad("seed", "use an integer in [0, 2**32)")
        if not isinstance(self.worker_count, int) or self.worker_count < 0:
            bad("worker_count", "use 0 (in-process) or a positive number of worker processes")
        if not isinstance(self.prefetch, int) or self.prefetch < 0:
            bad("prefetch", "use 0 (no prefetch) or a positive number of batches")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown data option(s) {', '.join(unknown)}: known are {', '.join(sorted(known))}")
        return cls(**d)


# ---- tokenizers --------------------------------------------------------------------------
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_NON_ESCAPE_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of any str, never raising: surrogate escapes (bytes read with
    errors="surrogateescape") become their original bytes; other lone surrogates (e.g. from a
    JSON "\\ud800" escape) become U+FFFD."""
    try:
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        return _NON_ESCAPE_SURROGATE.sub("\ufffd", text).encode("utf-8", errors="surrogateescape")


def _valid_str(text: str) -> str:
    """The text with every lone surrogate replaced by U+FFFD (the Rust tokenizers reject them)."""
    return _LONE_SURROGATE.sub("\ufffd", text) if _LONE_SURROGATE.search(text) else text


class ByteTokenizer:
    """id = byte value (0..255); PAD=256, BOS=257, EOS=258. Takes any bytes, valid UTF-8 or not."""

    name = "bytes"
    fingerprint = "bytes-v1"
    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str | bytes) -> np.ndarray:
        data = _utf8(text) if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def count_bytes(self, ids: Iterable[int]) -> int:
        """Number of text bytes the ids encode (special tokens count 0): exact for this tokenizer."""
        ids = np.asarray(ids).reshape(-1)
        return int(np.count_nonzero((ids >= 0) & (ids < 256)))

    def __repr__(self) -> str:
        return "ByteTokenizer()"


_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "[SEP]", "<|eos|>")
_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]")


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` (``tokenizers`` package; nothing is downloaded).

    EOS/PAD/BOS come from a ``tokenizer_config.json`` beside the file when present, else from
    the usual special-token names; a tokenizer without an end-of-text token is rejected (the
    packer needs one). PAD falls back to EOS, BOS to None.
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        path = os.path.abspath(os.path.expanduser(path))
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise UserError(f"tokenizer {path} not found: pass 'bytes' or the path of a local Hugging Face "
                            f"tokenizer.json (nothing is downloaded)")
        with open(path, "rb") as f:
            blob = f.read()
        try:
            self._tok = Tokenizer.from_str(blob.decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            msg = " ".join(str(e).split())[:200]
            raise UserError(f"{path} is not a valid Hugging Face tokenizer.json ({msg}): pass a tokenizer.json "
                            f"saved by the tokenizers/transformers libraries") from None
        self.name = path
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        special = self._config_special_tokens(os.path.dirname(path))
        self.eos_id = self._find(special.get("eos_token"), _EOS_NAMES)
        if self.eos_id is None:
            raise UserError(f"tokenizer {path} has no end-of-text token (none of {', '.join(_EOS_NAMES)}, and no "
                            f"eos_token in a tokenizer_config.json beside it): add one, e.g. "
                            f"tokenizer.add_special_tokens(['<|endoftext|>'])")
        pad = self._find(special.get("pad_token"), _PAD_NAMES)
        self.pad_id = self.eos_id if pad is None else pad
        self.bos_id = self._find(special.get("bos_token"), _BOS_NAMES)
        self.fingerprint = "hf-" + hashlib.sha256(blob).hexdigest()[:32] + f"-eos{self.eos_id}"

    @staticmethod
    def _config_special_tokens(folder: str) -> dict[str, str]:
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            return {}
        out = {}
        for key in ("eos_token", "pad_token", "bos_token"):
            v = cfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                out[key] = v
        return out

    def _find(self, preferred: str | None, names: Sequence[str]) -> int | None:
        for name in ((preferred,) if preferred else ()) + tuple(names):
            i = self._tok.token_to_id(name)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str | bytes, parse_special: bool = True) -> np.ndarray:
        """Token ids (no BOS/EOS added). Bytes are decoded as UTF-8 with errors="replace".

        ``parse_special=False`` treats special-token strings in the text as plain text (the
        data pipeline does this, so a literal "<|endoftext|>" in a document is not a boundary).
        """
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8", errors="replace")
        return self.encode_batch([text], parse_special=parse_special)[0]

    def encode_batch(self, texts: Sequence[str], parse_special: bool = True) -> list[np.ndarray]:
        old = self._tok.encode_special_tokens
        self._tok.encode_special_tokens = not parse_special
        try:
            encs = self._tok.encode_batch([_valid_str(t) for t in texts], add_special_tokens=False)
        finally:
            self._tok.encode_special_tokens = old
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

    def count_bytes(self, ids: Iterable[int]) -> int:
        """UTF-8 bytes of the decoded text (special tokens count 0)."""
        return len(self.decode(ids).encode("utf-8"))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r})"


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    """``"bytes"`` -> ByteTokenizer; a path to a tokenizer.json (or a folder holding one) -> HFTokenizer."""
    if spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec)


# ---- files and split ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SourceFile:
    path: str       # absolute
    relpath: str    # relative to the source root, "/"-separated: the split key
    format: str     # text | jsonl | npy


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    low = path.lower()
    if low.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if low.endswith(".npy"):
        return "npy"
    return "text"


def _walk(root: str, suffix: str | None = None, exclude: frozenset[str] = frozenset()) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in exclude]
        for fn in filenames:
            if fn.startswith(".") or (suffix is not None and not fn.endswith(suffix)):
                continue
            p = os.path.join(dirpath, fn)
            if os.path.isfile(p):
                out.append(p)
    return out


def list_files(cfg: DataConfig) -> list[SourceFile]:
    """All files of the source, sorted by relative path (independent of the filesystem order)."""
    src = cfg.source
    if src == "stdlib":
        root = stdlib_root()
        paths = _walk(root, ".py", STDLIB_EXCLUDE_DIRS)
        if not paths:
            raise UserError(f"no *.py files under the standard library {root}: pass data.source=<path or glob>")
    elif re.search(r"[*?\[]", src):
        pattern = os.path.expanduser(src)
        paths = [p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not paths:
            raise UserError(f"data source glob {src!r} matches no files: check the pattern (quote it in the shell)")
        parts = pattern.split(os.sep)
        fixed = []
        for part in parts[:-1]:
            if re.search(r"[*?\[]", part):
                break
            fixed.append(part)
        root = os.sep.join(fixed) or ("/" if pattern.startswith(os.sep) else ".")
    else:
        path = os.path.expanduser(src)
        if os.path.isdir(path):
            root = path
            paths = _walk(path)
            if not paths:
                raise UserError(f"data source directory {src} holds no (non-hidden) files: add data or pass another path")
        elif os.path.isfile(path):
            root = os.path.dirname(path) or "."
            paths = [path]
        else:
            raise UserError(f"data source {src} does not exist: pass an existing file, directory or glob, "
                            f"or 'stdlib' for the built-in corpus")
    root = os.path.abspath(root)
    files = []
    for p in paths:
        p = os.path.abspath(p)
        rel = os.path.relpath(p, root).replace(os.sep, "/")
        files.append(SourceFile(p, rel, _format_of(p, cfg.format)))
    files.sort(key=lambda f: f.relpath)
    return files


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic split: the first 8 bytes of sha256(key) as a fraction of 2**64, below ``fraction``.

    Raising the fraction only moves units from train to held-out, never back.
    """
    h = int.from_bytes(hashlib.sha256(_utf8(key)).digest()[:8], "big")
    return h / 2.0**64 < fraction


@dataclasses.dataclass(frozen=True)
class _Unit:
    """One split unit: a whole text or .npy file, or one JSONL record (key "relpath:line")."""
    key: str
    file: SourceFile
    text: str | None = None   # JSONL records carry their text


def _jsonl_units(f: SourceFile, field: str) -> list[_Unit]:
    units = []
    with open(f.path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.decode("utf-8", errors="replace").strip().lstrip("\ufeff")
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{f.path} line {lineno}: unreadable JSONL line ({e.msg} at column {e.colno}): "
                                f"each line must be one JSON object") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                what = "not a JSON object" if not isinstance(obj, dict) else (
                    f"no field {field!r}" if field not in obj else f"field {field!r} is not a string")
                raise UserError(f"{f.path} line {lineno}: unreadable JSONL line ({what}): each line must be an "
                                f"object with a string field {field!r} (set data.text_field to change the field)")
            units.append(_Unit(f"{f.relpath}:{lineno}", f, obj[field]))
    return units


def _units(cfg: DataConfig) -> list[_Unit]:
    units: list[_Unit] = []
    for f in list_files(cfg):
        if f.format == "jsonl":
            units.extend(_jsonl_units(f, cfg.text_field))
        else:
            units.append(_Unit(f.relpath, f))
    return units


@dataclasses.dataclass(frozen=True)
class Split:
    train: list[_Unit]
    heldout: list[_Unit]
    by_tokens: bool   # one side would be empty: held-out = the last heldout_fraction of the whole token stream


def split_units(cfg: DataConfig) -> Split:
    """Train / held-out units. Units are files (text, .npy) or JSONL records, assigned by
    ``is_heldout(relative path[:line])``. If that leaves a side empty (e.g. a single file) while
    heldout_fraction > 0, the split falls back to tokens: the held-out part is the last
    ceil(fraction * n) tokens of the whole stream, the rest is train. A fraction of 1 holds
    everything out (evaluation over a whole source)."""
    units = _units(cfg)
    if cfg.heldout_fraction <= 0:
        return Split(units, [], False)
    if cfg.heldout_fraction >= 1:
        return Split([], units, False)
    train = [u for u in units if not is_heldout(u.key, cfg.heldout_fraction)]
    held = [u for u in units if is_heldout(u.key, cfg.heldout_fraction)]
    if not train or not held:
        return Split(units, units, True)
    return Split(train, held, False)


def split_files(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """Split keys (relative paths; "relpath:line" for JSONL records) of train and held-out.
    After the token-level fallback (``split_units(cfg).by_tokens``) both lists hold every key."""
    s = split_units(cfg)
    return [u.key for u in s.train], [u.key for u in s.heldout]


# ---- token streams -----------------------------------------------------------------------
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
    eos = np.asarray([tok.eos_id], dtype)
    if isinstance(tok, ByteTokenizer):
        parts = []
        for d in docs:
            b = _utf8(d) if isinstance(d, str) else d
            parts += [np.frombuffer(b, np.uint8), eos]
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros((0,), dtype)

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
    progress = None
    if n_bytes > 4 << 20:
        from tqdm import tqdm
        progress = tqdm(total=len(texts), desc=f"tokenising {n_bytes / 2**20:.0f} MiB", unit="doc",
                        file=sys.stderr, mininterval=2.0)
    for i in range(0, len(texts), chunk):
        for ids in tok.encode_batch(texts[i: i + chunk], parse_special=False):
            parts += [ids.astype(dtype), eos]
        if progress is not None:
            progress.update(len(texts[i: i + chunk]))
    if progress is not None:
        progress.close()
    out = np.concatenate(parts) if parts else np.zeros((0,), dtype)
    if cache:
        tmp = f"{cache}.{uuid.uuid4().hex}.tmp.npy"  # unique even across hosts sharing the folder
        try:
            os.makedirs(folder, exist_ok=True)
            np.save(tmp, out)
            os.replace(tmp, cache)
        except OSError:  # caching is an optimisation only
            try:
                os.remove(tmp)
            except OSError:
                pass
    return out


def _doc_bytes(d: bytes | str) -> int:
    return len(d) if isinstance(d, (bytes, bytearray)) else len(_utf8(d))


def _check_ids(seg: "_Npy", tok: Tokenizer, chunk: int = 1 << 24) -> None:
    """Every id of a .npy file in [0, vocab_size): read once, in chunks, when the stream is built
    (a bad id would otherwise index past the embedding silently, or fail hours into a run)."""
    for lo in range(0, len(seg), chunk):
        a = seg.read(lo, lo + chunk)
        lo_id, hi_id = int(a.min()), int(a.max())
        if lo_id < 0 or hi_id >= tok.vocab_size:
            bad = hi_id if hi_id >= tok.vocab_size else lo_id
            raise UserError(f"{seg.path}: token id {bad} is outside the tokenizer's vocabulary [0, {tok.vocab_size}) "
                            f"(data.tokenizer={tok.name}): set data.tokenizer to the tokenizer that made these ids")


def _stream(units: Sequence[_Unit], tok: Tokenizer, with_bytes: bool = False) -> tuple[TokenStream, int, int]:
    """(stream of the units in order, every document followed by EOS; source bytes; documents).

    Empty documents are skipped. Text is tokenised in one go per run of text units; .npy files
    stay memory-mapped (their ids are used as they are, EOS after each file). ``with_bytes``
    counts the text bytes of .npy ids through the tokenizer (reads them); text units always
    count their source bytes (tokenizer-independent, for bits per byte).
    """
    dtype = _token_dtype(tok.vocab_size)
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
            _check_ids(seg, tok)
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


def _split_streams(cfg: DataConfig, tok: Tokenizer, which: str,
                   with_bytes: bool = False) -> tuple[TokenStream, int, int, int]:
    """(stream, bytes, documents, units) of ``which`` in {"train", "heldout"}. Bytes of text units
    are always counted; bytes of .npy ids (and of a token-level split) only ``with_bytes``."""
    s = split_units(cfg)
    if not s.by_tokens:
        units = s.train if which == "train" else s.heldout
        stream, n_bytes, n_docs = _stream(units, tok, with_bytes=with_bytes)
        return stream, n_bytes, n_docs, len(units)
    full, _, n_docs = _stream(s.train, tok)
    n = len(full)
    n_held = min(n, max(1, math.ceil(cfg.heldout_fraction * n)))
    part = full.slice(0, n - n_held) if which == "train" else full.slice(n - n_held, n)
    n_bytes = tok.count_bytes(part.read(0, len(part))) if with_bytes else 0
    return part, n_bytes, n_docs, len(s.train)


def heldout_tokens(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """(1-D int32 held-out token stream, documents in relative-path order each followed by EOS;
    number of UTF-8 bytes of text it encodes). Bits per byte over the whole stream:
    ``bpb = loss_nats * n_targets / (ln 2 * n_bytes)``; when only part of the stream is scored,
    count that part's bytes with ``tokenizer.count_bytes(scored_ids)``."""
    if cfg.heldout_fraction <= 0:
        raise UserError("data.heldout_fraction is 0, so there is no held-out data: set it above 0 "
                        "(e.g. 0.05) or evaluate on another source")
    stream, n_bytes, _, _ = _split_streams(cfg, tokenizer, "heldout", with_bytes=True)
    if len(stream) == 0:
        raise UserError(f"the held-out split of {cfg.source} is empty: add data or raise data.heldout_fraction")
    return stream.read(0, len(stream)), int(n_bytes)


def all_tokens(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """Like :func:`heldout_tokens` for every unit of the source, whatever the split: (1-D int32
    stream of all documents in relative-path order, each followed by EOS; text bytes it encodes)."""
    stream, n_bytes, _ = _stream(_units(cfg), tokenizer, with_bytes=True)
    if len(stream) == 0:
        raise UserError(f"data source {cfg.source} holds no text or token ids: add data or point to another source")
    return stream.read(0, len(stream)), int(n_bytes)


def corpus_stats(cfg: DataConfig, tokenizer: Tokenizer) -> dict[str, dict[str, int]]:
    """Sizes of both splits: units (files or JSONL records), documents, source bytes, tokens (EOS included)."""
    out = {}
    for which in ("train", "heldout"):
        if which == "heldout" and cfg.heldout_fraction <= 0:
            out[which] = {"units": 0, "documents": 0, "bytes": 0, "tokens": 0}
            continue
        stream, n_bytes, n_docs, n_units = _split_streams(cfg, tokenizer, which, with_bytes=True)
        out[which] = {"units": n_units, "documents": n_docs, "bytes": int(n_bytes), "tokens": len(stream)}
    return out


# ---- the training iterator ---------------------------------------------------------------
class _LocalRows:
    """Global batch of record indices -> this process's rows of tokens (a picklable grain map).
    Only this process's rows are read."""

    def __init__(self, stream: TokenStream, width: int, lo: int, hi: int):
        self.stream, self.width, self.lo, self.hi = stream, width, lo, hi

    def __call__(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {"tokens": self.stream.rows(np.asarray(index)[self.lo: self.hi], self.width)}


class DataIterator:
    """Infinite iterator of {"tokens": int32 [global_batch // process_count, seq_len + 1]}.

    Batch k holds records ``shuffle_e(j mod N)`` for j in [k*G, (k+1)*G), epoch e = j // N,
    with a fresh permutation of the N records per epoch (seed + epoch); this process gets rows
    [process_index*local, (process_index+1)*local). ``get_state()`` is {"next_batch": k, ...};
    ``set_state`` rebuilds the pipeline from batch k, so the next batch equals the
    uninterrupted run's, whatever the prefetch depth, worker count or process count.
    """

    def __init__(self, cfg: DataConfig, stream: TokenStream, global_batch: int,
                 process_index: int, process_count: int, n_bytes: int | None = None):
        import grain

        self.cfg, self.global_batch = cfg, global_batch
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = global_batch // process_count
        self.width = cfg.seq_len + 1
        self.num_records = len(stream) // self.width
        self.train_tokens = len(stream)
        self.train_bytes = n_bytes
        rows = _LocalRows(stream, self.width, process_index * self.local_batch,
                          (process_index + 1) * self.local_batch)
        self._batches = (grain.MapDataset.range(self.num_records)
                         .shuffle(seed=cfg.seed)
                         .repeat()
                         .batch(global_batch, drop_remainder=True)
                         .map(rows))
        self._it = None
        self._start(0)

    def _start(self, next_batch: int) -> None:
        import grain

        self.close()
        ds = self._batches[next_batch:].to_iter_dataset(
            grain.ReadOptions(num_threads=1 if self.cfg.prefetch and not self.cfg.worker_count else 0,
                              prefetch_buffer_size=self.cfg.prefetch))
        if self.cfg.worker_count:
            from absl import flags  # grain's worker processes read absl flags; use their defaults

            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.cfg.worker_count, per_worker_buffer_size=max(1, self.cfg.prefetch)))
        self._it = iter(ds)
        self._next_batch = next_batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self._next_batch += 1
        return batch

    @property
    def next_batch(self) -> int:
        return self._next_batch

    @property
    def epoch(self) -> float:
        """Epochs of the training records consumed so far."""
        return self._next_batch * self.global_batch / self.num_records

    def _fingerprint(self) -> dict[str, Any]:
        return {"seed": self.cfg.seed, "seq_len": self.cfg.seq_len, "global_batch": self.global_batch,
                "num_records": self.num_records, "train_tokens": self.train_tokens}

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "next_batch": self._next_batch, **self._fingerprint()}

    def set_state(self, state: dict[str, Any]) -> None:
        nb = state.get("next_batch") if isinstance(state, dict) else None
        if (state.get("version") if isinstance(state, dict) else None) != _STATE_VERSION or \
                not isinstance(nb, numbers.Integral) or isinstance(nb, bool) or nb < 0:
            raise UserError(f"data iterator state {str(state)[:120]!r} is not one this version wrote: "
                            f"resume from a checkpoint written by parscale_jax, or start the data afresh")
        mine = self._fingerprint()
        diff = [f"{k} {state.get(k)} -> {v}" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise UserError(f"the checkpoint's data position was made for other data ({', '.join(diff)}): "
                            f"resume with the same data settings and global batch, or start the data afresh")
        self._start(int(state["next_batch"]))

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            try:
                it.close()
            except Exception:  # best effort: background threads/processes end with the iterator
                pass

    def __del__(self):
        if getattr(self, "_it", None) is not None:
            self.close()


def train_iterator(cfg: DataConfig, tokenizer: Tokenizer, global_batch: int, process_index: int = 0,
                   process_count: int = 1) -> DataIterator:
    """Infinite, shuffled, packed training batches for this process (see DataIterator)."""
    if not isinstance(global_batch, numbers.Integral) or global_batch < 1:
        raise UserError(f"global batch {global_batch!r} is invalid: use a positive integer")
    if (not isinstance(process_count, numbers.Integral) or not isinstance(process_index, numbers.Integral)
            or process_count < 1 or not 0 <= process_index < process_count):
        raise UserError(f"process_index {process_index} / process_count {process_count} is invalid: "
                        f"need 0 <= process_index < process_count")
    if global_batch % process_count:
        raise UserError(f"global batch {global_batch} does not split over {process_count} processes: "
                        f"use a multiple of {process_count}")
    global_batch, process_index, process_count = int(global_batch), int(process_index), int(process_count)
    if cfg.heldout_fraction >= 1:
        raise UserError("data.heldout_fraction is 1, so nothing is left to train on: use a fraction below 1 "
                        "(default 0.05)")
    stream, n_bytes, n_docs, n_units = _split_streams(cfg, tokenizer, "train")
    if len(stream) == 0:
        raise UserError(f"the training split of data source {cfg.source} is empty ({n_units} files/records, "
                        f"no text or token ids in them): add data or point data.source elsewhere")
    if len(stream) < cfg.seq_len + 1:
        raise UserError(f"the training split of {cfg.source} has {len(stream)} tokens, fewer than one sequence "
                        f"(seq_len + 1 = {cfg.seq_len + 1}): add data or lower data.seq_len")
    return DataIterator(cfg, stream, global_batch, process_index, process_count, n_bytes)
