"""Sources and the train / held-out split: files of a source, split units, the hash rule.

Units are files (text, ``.npy``) or JSONL records (key ``relpath:line``); a unit is held out
when the first 8 bytes of ``sha256(key)``, as a fraction of 2**64, are below
``heldout_fraction`` (see :func:`split_units` for the token-level fallback).
"""
from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import json
import os
import re
import sysconfig
from typing import Iterator

from parscale_jax.data.config import DataConfig
from parscale_jax.data.tokenizer import _utf8
from parscale_jax.errors import UserError

STDLIB_EXCLUDE_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
DATASETS_METADATA = frozenset({"state.json", "dataset_info.json", "dataset_dict.json"})


@dataclasses.dataclass(frozen=True)
class SourceFile:
    path: str       # absolute
    relpath: str    # relative to the source root, "/"-separated: the split key
    format: str     # text | jsonl | npy | parquet | arrow


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
    if low.endswith(".parquet"):
        return "parquet"
    if low.endswith(".arrow"):
        return "arrow"
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
    arrow_dirs = {os.path.dirname(os.path.abspath(p)) for p in paths if p.lower().endswith(".arrow")}
    for p in paths:
        folder = os.path.dirname(os.path.abspath(p))
        if os.path.basename(p) in DATASETS_METADATA and any(d == folder or d.startswith(folder + os.sep)
                                                            for d in arrow_dirs):
            continue  # the metadata of a `datasets` folder (or DatasetDict) saved with save_to_disk
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


def jsonl_lines(path: str):
    """(line number, stripped text) of every non-blank line of a JSONL file (a blank line is no unit)."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.decode("utf-8", errors="replace").strip().lstrip("\ufeff")
            if line:
                yield lineno, line


def _jsonl_units(f: SourceFile, field: str) -> list[_Unit]:
    units = []
    for lineno, line in jsonl_lines(f.path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{f.path} line {lineno}: unreadable JSONL line ({e.msg} at column {e.colno}): "
                            f"each line must be one JSON object") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            what = "not a JSON object" if not isinstance(obj, dict) else (
                f"no field {field!r}" if field not in obj else f"field {field!r} is not a string")
            raise UserError(f"{f.path} line {lineno}: unreadable JSONL line ({what}): each line must be an "
                            f"object with a string field {field!r} (set data.text_field or --text-field to change "
                            f"the field)")
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


# ---- columnar files (Parquet; Arrow files of a `datasets` folder saved with save_to_disk) ----------------
def parquet_file(path: str, field: str):
    """A pyarrow ParquetFile whose column ``field`` holds text (else a UserError)."""
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses
        raise UserError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())[:200]}): "
                        f"check the file or leave it out") from None
    _check_field(path, pf.schema_arrow, field)
    return pf


def _arrow_reader(src, path: str):
    import pyarrow as pa
    for opener in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            return opener(src)
        except Exception:  # noqa: BLE001 - try the other IPC layout
            src.seek(0)
    raise UserError(f"{path}: not a readable Arrow file (IPC stream or file): check the file or leave it out")


def arrow_batches(path: str, field: str) -> Iterator:
    """The record batches of an Arrow IPC file (a `datasets` folder's data files) with a text column ``field``."""
    import pyarrow as pa
    with pa.memory_map(path) as src:
        reader = _arrow_reader(src, path)
        _check_field(path, reader.schema, field)
        if hasattr(reader, "num_record_batches"):
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        else:
            yield from reader


def _check_field(path: str, schema, field: str) -> None:
    import pyarrow as pa
    if field not in schema.names:
        raise UserError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)[:200]}): "
                        f"pass --text-field with the column that holds the text")
    t = schema.field(field).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t)):
        raise UserError(f"{path}: column {field!r} is {t}, not text: pass --text-field with the column that "
                        f"holds the text")
