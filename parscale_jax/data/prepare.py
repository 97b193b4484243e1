"""``prepare``: sources -> token shards + ``manifest.json`` (the format :mod:`.shards` reads), once, offline.

The inputs are listed like a training source (:func:`.sources.list_files`: files, directories,
globs, ``stdlib``) and cut into work items: a group of text files, a JSONL file, a Parquet row
group, an Arrow file of a ``datasets`` folder saved with ``save_to_disk``, a ``.npy`` file. Worker
processes tokenise items; the main process writes their results in item order, so the output does
not depend on the number of workers. ``.npy`` token ids are not re-tokenised: they are copied in
chunks with a dtype cast (one document per file).

Each split (train / held-out, by :func:`.sources.is_heldout` of the unit key) is a stream of
documents, each followed by EOS, cut into shards of ``shard_tokens`` tokens. A shard is written
to a temporary name and renamed; then a sidecar in ``DIR/.prepare/`` records it and where the
run stood. A killed run, started again with the same arguments, keeps the recorded shards and
goes on from the last work item it can resume exactly; a half-written shard never counts. The
manifest is written last.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import threading
import time
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from parscale_jax.data import shards as S
from parscale_jax.data.config import DataConfig
from parscale_jax.data.sources import (SourceFile, _jsonl_units, arrow_batches, is_heldout, jsonl_lines, list_files,
                                       parquet_file)
from parscale_jax.data.tokenizer import Tokenizer, _utf8, encode_documents, load_tokenizer
from parscale_jax.data.tokens import _open_npy, npy_raw_offset
from parscale_jax.errors import UserError
from parscale_jax.fileio import atomic_file, write_json

DEFAULT_SHARD_TOKENS = 1 << 27          # 128Mi tokens: 256 MiB of uint16
GROUP_BYTES, GROUP_FILES = 8 << 20, 512  # text files per work item
NPY_CHUNK = 1 << 24                      # tokens per copy step of a .npy
STATE = ".prepare"


@dataclasses.dataclass(frozen=True)
class Item:
    """One work item: text files (several), or one JSONL / Parquet row group / Arrow / .npy file."""
    kind: str
    files: tuple[SourceFile, ...]
    group: int = 0      # Parquet row group
    row0: int = 0       # Parquet: the group's first row in the file
    rows: int = 0       # Parquet / Arrow rows
    nbytes: int = 0     # input bytes (progress)


# ---- inputs -> work items -------------------------------------------------------------------------
def _input_files(inputs: Sequence[str], fmt: str = "auto") -> list[SourceFile]:
    if not inputs:
        raise UserError("no inputs: pass --input with files, directories, globs or 'stdlib'")
    files: list[SourceFile] = []
    for src in inputs:
        files += list_files(DataConfig(source=src, format=fmt))
    return files


def plan(inputs: Sequence[str], text_field: str = "text", fmt: str = "auto") -> list[Item]:
    """The work items of the inputs, in unit order (inputs as given, each in relative-path order).
    ``fmt``: the format of every file ("auto": by extension; see ``DataConfig.format``)."""
    items: list[Item] = []
    group: list[SourceFile] = []
    gbytes = 0

    def flush():
        nonlocal gbytes
        if group:
            items.append(Item("text", tuple(group), nbytes=gbytes))
            group.clear()
            gbytes = 0

    for f in _input_files(inputs, fmt):
        size = os.path.getsize(f.path)
        if f.format == "text":
            group.append(f)
            gbytes += size
            if gbytes >= GROUP_BYTES or len(group) >= GROUP_FILES:
                flush()
            continue
        flush()
        if f.format == "parquet":
            md = parquet_file(f.path, text_field).metadata
            row0 = 0
            for g in range(md.num_row_groups):
                n = md.row_group(g).num_rows
                items.append(Item("parquet", (f,), g, row0, n, size * n // max(md.num_rows, 1)))
                row0 += n
        elif f.format == "arrow":
            rows = sum(b.num_rows for b in arrow_batches(f.path, text_field))
            items.append(Item("arrow", (f,), rows=rows, nbytes=size))
        elif f.format == "npy":
            _open_npy(f.path)  # the header: a bad file is an error before anything is written
            items.append(Item("npy", (f,), nbytes=size))
        else:
            items.append(Item(f.format, (f,), nbytes=size))
    flush()
    return items


def _keys(item: Item) -> Iterator[str]:
    """The split keys of an item's units, in order (reads a JSONL file's lines, no other data)."""
    f = item.files[0]
    if item.kind in ("text", "npy"):
        yield from (g.relpath for g in item.files)
    elif item.kind == "jsonl":
        yield from (f"{f.relpath}:{lineno}" for lineno, _ in jsonl_lines(f.path))
    else:
        yield from (f"{f.relpath}:{r}" for r in range(item.row0, item.row0 + item.rows))


def split_mode(items: Sequence[Item], fraction: float) -> str:
    """"train" / "heldout" (everything on one side), "hash" (by unit key), or "tokens": the key rule
    would leave a side empty, so the held-out part is the last ceil(fraction * n) tokens."""
    if fraction <= 0:
        return "train"
    if fraction >= 1:
        return "heldout"
    seen = set()
    for item in items:
        for key in _keys(item):
            seen.add(is_heldout(key, fraction))
            if len(seen) == 2:
                return "hash"
    return "tokens"


# ---- work items -> tokens (in worker processes) -----------------------------------------------------
_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(spec: str) -> Tokenizer:
    tok = _TOKENIZERS.get(spec)
    if tok is None:
        tok = _TOKENIZERS[spec] = load_tokenizer(spec)
    return tok


def _column_docs(item: Item, field: str) -> list[tuple[str, str | bytes]]:
    f = item.files[0]
    if item.kind == "parquet":
        col = parquet_file(f.path, field).read_row_group(item.group, columns=[field]).column(0).to_pylist()
    else:
        col = [v for b in arrow_batches(f.path, field) for v in b.column(field).to_pylist()]
    return [(f"{f.relpath}:{item.row0 + i}", v if v is not None else "") for i, v in enumerate(col)]


def _docs(item: Item, field: str) -> list[tuple[str, str | bytes]]:
    """(unit key, document) of every unit of a (non-.npy) item."""
    if item.kind == "text":
        out = []
        for f in item.files:
            try:
                with open(f.path, "rb") as fh:
                    out.append((f.relpath, fh.read()))
            except OSError as e:
                raise UserError(f"cannot read data file {f.path} ({e.strerror}): check the path and "
                                f"permissions") from None
        return out
    if item.kind == "jsonl":
        return [(u.key, u.text) for u in _jsonl_units(item.files[0], field)]
    return _column_docs(item, field)


def work(args: tuple) -> dict[str, Any] | None:
    """Tokenise one item: per side ("train"/"heldout", or everything to ``mode``'s side) the ids of its
    non-empty documents, each followed by EOS, and their end offsets. None for a .npy (copied by the writer).
    With a ``spool`` path (worker processes) the arrays go to files ``spool.SIDE.ids/.ends`` and the
    result holds those paths: a pipe moves tens of MB/s, the page cache GB/s."""
    item, spec, field, fraction, mode, dtype, spool = args
    if item.kind == "npy":
        return None
    tok = _tokenizer(spec)
    sides: dict[str, list] = {"train": [], "heldout": []}
    n_bytes = 0
    for key, doc in _docs(item, field):
        if len(doc):
            side = ("heldout" if is_heldout(key, fraction) else "train") if mode == "hash" else _side(mode)
            sides[side].append(doc)
            n_bytes += len(doc) if isinstance(doc, bytes) else len(_utf8(doc))
    out: dict[str, Any] = {"bytes": n_bytes, "docs": sum(len(v) for v in sides.values())}
    for side, docs in sides.items():
        out[side] = encode_documents(tok, docs, dtype) if docs else None
        if out[side] is not None and spool:
            paths = (f"{spool}.{side}.ids", f"{spool}.{side}.ends")
            for a, path in zip(out[side], paths):
                a.tofile(path)
            out[side] = paths
    return out


def _unspool(res: tuple, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """A worker's (ids, ends) back from its spool files (which are removed)."""
    if not isinstance(res[0], str):
        return res
    ids, ends = np.fromfile(res[0], dtype=S.DTYPES[dtype]), np.fromfile(res[1], dtype=np.int64)
    for path in res:
        os.remove(path)
    return ids, ends


def _side(mode: str) -> str:
    return "heldout" if mode == "heldout" else "train"


# ---- tokens -> shards (in the main process, in item order) -------------------------------------------
class ShardWriter:
    """One split's shards. Receives the split's tokens in stream order (``pos`` counts them) and drops
    the first ``skip`` (already in the finished shards ``done`` of an earlier run). Each shard is
    written to a temporary file, renamed when full, then recorded by a sidecar (``.prepare/NAME.json``)
    holding the manifest entry and ``ctx``: the work item being written and every split's position
    when it began (where a resumed run can start). Background threads, each in order: "hash" hashes
    and checks pieces, "sync" fsyncs a full shard, waits for its hash, renames it, writes its sidecar."""

    MAX_PENDING = 16

    def __init__(self, out: str, split: str, prefix: str, dtype: str, shard_tokens: int,
                 done: list[dict], pos: int):
        self.out, self.split, self.prefix, self.dtype = out, split, prefix, np.dtype(S.DTYPES[dtype])
        self.shard_tokens, self.done, self.pos = shard_tokens, list(done), pos
        self.skip = sum(int(r["tokens"]) for r in done)
        self.ctx: tuple[int, dict[str, int]] = (0, {})
        self._f, self._index, self._pending = None, len(done), collections.deque()
        self._threads: dict[str, concurrent.futures.ThreadPoolExecutor] = {}

    def add(self, ids: np.ndarray, ends: np.ndarray, check=None, src: tuple[int, int] | None = None) -> None:
        """Append tokens; ``ends``: cumulative end offsets (within ``ids``) of the documents ending in them.
        ``check(lo, hi)``: called (in the background) with each piece's smallest and largest id, raises on
        bad ids (a .npy against the vocabulary). ``src``: (fd, byte offset) of ``ids`` in a file of
        this dtype: the bytes are copied by the kernel (``os.copy_file_range``) instead of written."""
        start, self.pos = self.pos, self.pos + len(ids)
        if self.pos <= self.skip:
            return
        off = max(self.skip - start, 0)   # tokens of ids already done
        ends = ends[ends > off] - off
        while off < len(ids):
            if self._f is None:
                self._open()
            piece = ids[off: off + self.shard_tokens - self._count]
            k = int(np.searchsorted(ends, len(piece), side="right"))
            self._ends.append(ends[:k] + self._count)
            ends = ends[k:] - len(piece)
            data = np.ascontiguousarray(piece.astype(self.dtype, copy=False))
            if src is not None:
                S.copy_range(src[0], self._f.fileno(), src[1] + off * self.dtype.itemsize, data.nbytes)
            else:
                S.write_all(self._f, memoryview(data).cast("B"))
            if hasattr(os, "posix_fadvise"):  # start the writeback now (the fsync waits for less)
                os.posix_fadvise(self._f.fileno(), self._count * self.dtype.itemsize, data.nbytes,
                                 os.POSIX_FADV_DONTNEED)
            self._submit("hash", _digest, self._state, data, check)
            self._count += len(piece)
            off += len(piece)
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> None:
        """Finish the last (partial) shard and wait for the background work (its errors raise here)."""
        if self._f is not None and self._count:
            self._finish()
        self.drain()

    def drain(self, raise_errors: bool = True) -> None:
        while self._pending:
            fut = self._pending.popleft()
            fut.result() if raise_errors else fut.exception()
        for ex in self._threads.values():
            ex.shutdown(wait=True)
        self._threads.clear()

    def _submit(self, thread: str, fn, *args) -> concurrent.futures.Future:
        if thread not in self._threads:
            self._threads[thread] = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"prepare-{thread}")
        fut = self._threads[thread].submit(fn, *args)
        self._pending.append(fut)
        while self._pending and (len(self._pending) > self.MAX_PENDING or self._pending[0].done()):
            self._pending.popleft().result()
        return fut

    def _name(self) -> str:
        return f"{self.prefix}-{self._index:05d}"

    def _open(self) -> None:
        self._tmp = os.path.join(self.out, f".{self._name()}.bin.tmp")
        self._f = open(self._tmp, "wb", buffering=0)
        self._state, self._count, self._ends = {"sha": hashlib.sha256(), "max": -1}, 0, []

    def _finish(self) -> None:
        name = self._name()
        ends = np.concatenate(self._ends).astype("<u8") if self._ends else np.zeros((0,), "<u8")
        rec = {"file": name + ".bin", "split": self.split, "tokens": self._count, "documents": len(ends),
               "max_id": None, "bytes": self._count * self.dtype.itemsize, "sha256": None,
               "doc_ends": name + ".idx", "_item": self.ctx[0], "_before": dict(self.ctx[1])}
        hashed = self._submit("hash", lambda: None)  # done when every piece of this shard is hashed
        self._submit("sync", self._finalize, self._f, self._tmp, self._state, ends, rec, hashed)
        self._f, self._index = None, self._index + 1

    def _finalize(self, f, tmp: str, state: dict, ends: np.ndarray, rec: dict, hashed) -> None:
        """(background) fsync; then, its hash done and good, the .idx, rename, the sidecar."""
        with f:
            os.fsync(f.fileno())  # unbuffered: nothing to flush
            if hasattr(os, "posix_fadvise"):  # written and synced: its pages need not crowd the page cache
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        concurrent.futures.wait([hashed])
        if state.get("failed"):  # a piece failed its check: never renamed, no sidecar
            return
        with atomic_file(os.path.join(self.out, rec["doc_ends"]), "wb") as g:
            g.write(ends.tobytes())
        os.replace(tmp, os.path.join(self.out, rec["file"]))
        rec["sha256"], rec["max_id"] = state["sha"].hexdigest(), state["max"]
        write_json(os.path.join(self.out, STATE, rec["file"][:-4] + ".json"), rec, indent=None)
        self.done.append(rec)


def _digest(state: dict, data: np.ndarray, check) -> None:
    """(background) a piece of a shard: into its sha256 and largest id; ``check`` its id range."""
    try:
        state["sha"].update(memoryview(data).cast("B"))
        hi = int(data.max())
        state["max"] = max(state["max"], hi)
        if check is not None:
            check(0 if data.dtype.kind == "u" else int(data.min()), hi)
    except BaseException:
        state["failed"] = True   # the shard is never finalized (no rename, no sidecar)
        raise


def _finished(out: str, prefix: str) -> list[dict]:
    """The shards of ``prefix`` a previous run finished: sidecar present, files of the recorded sizes."""
    done: list[dict] = []
    while True:
        name = f"{prefix}-{len(done):05d}"
        try:
            with open(os.path.join(out, STATE, name + ".json"), encoding="utf-8") as f:
                rec = json.load(f)
            ok = (os.path.getsize(os.path.join(out, rec["file"])) == rec["bytes"]
                  and os.path.getsize(os.path.join(out, rec["doc_ends"])) == 8 * rec["documents"])
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            return done
        done.append(rec)


def _restart(done: dict[str, list[dict]]) -> tuple[int, dict[str, int]]:
    """The latest work item a run can restart from so that no split needs tokens it no longer holds:
    every split's position when that item began is at most the tokens of its finished shards."""
    have = {s: sum(int(r["tokens"]) for r in recs) for s, recs in done.items()}
    best = (0, {s: 0 for s in done})
    for recs in done.values():
        for r in recs:
            before = {s: int(r["_before"].get(s, 0)) for s in done}
            if r["_item"] > best[0] and all(before[s] <= have[s] for s in done):
                best = (int(r["_item"]), before)
    return best


def _copy_npy(item: Item, w: ShardWriter, tok: Tokenizer, bar, id_limit: int | None = None) -> tuple[int, int]:
    """Stream a .npy file's ids into the writer in chunks (checked against the vocabulary, cast to the
    shard dtype), then EOS: one document. (tokens, documents)."""
    f = item.files[0]
    a = _open_npy(f.path)
    n = len(a)
    offset = npy_raw_offset(f.path, w.dtype)
    limit = id_limit or tok.vocab_size

    def check(lo_id: int, hi_id: int) -> None:
        if lo_id < 0 or hi_id >= limit:
            bad = hi_id if hi_id >= limit else lo_id
            if id_limit:
                raise UserError(f"{f.path}: token id {bad} is outside the model's vocabulary [0, {limit}): "
                                f"these ids were made for another model")
            raise UserError(f"{f.path}: token id {bad} is outside the tokenizer's vocabulary [0, {limit}) "
                            f"(--tokenizer {tok.name}): pass the tokenizer that made these ids")

    with open(f.path, "rb") as fh:
        for lo in range(0, n, NPY_CHUNK):
            chunk = a[lo: lo + NPY_CHUNK]
            if chunk.dtype != w.dtype:  # cast in the main thread: checked before the cast can wrap
                check(0 if chunk.dtype.kind == "u" else int(chunk.min()), int(chunk.max()))
            src = None if offset is None or not hasattr(os, "copy_file_range") else \
                (fh.fileno(), offset + lo * w.dtype.itemsize)
            w.add(chunk, np.zeros((0,), np.int64), check=check, src=src)
            bar.update(len(chunk) * a.dtype.itemsize)
    if n:
        w.add(np.asarray([tok.eos_id], w.dtype), np.asarray([1], np.int64))
    return n + (1 if n else 0), 1 if n else 0


def _feed(item: Item, res: dict | None, writers: dict[str, ShardWriter], job: dict, tok: Tokenizer,
          bar) -> tuple[int, int]:
    """Write one item's result (a worker's tokens, or the .npy copied here); (tokens, documents)."""
    mode = job["mode"]
    if res is None:
        key = item.files[0].relpath
        side = ("heldout" if is_heldout(key, job["heldout_fraction"]) else "train") if mode == "hash" else _side(mode)
        return _copy_npy(item, writers[side], tok, bar, job["id_limit"])
    tokens = 0
    for side in ("train", "heldout"):
        if res[side] is not None:
            ids, ends = _unspool(res[side], job["dtype"])
            writers[side].add(ids, ends)
            tokens += len(ids)
    bar.update(item.nbytes)
    return tokens, res["docs"]


def _pool(workers: int):
    """``workers`` processes (None for 1: in-process). Forked when this process runs no other thread (but
    tqdm's idle monitor) and no JAX (the command line: starts in milliseconds), else spawned."""
    if workers <= 1:
        return None
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and t.name != "tqdm_monitor"]
    fork = not others and "jax" not in sys.modules and "fork" in multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if fork else "spawn").Pool(workers, initializer=_one_thread)


def _one_thread() -> None:
    """(worker process) one tokenising thread per worker: --workers sets the parallelism."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _run(out: str, items: list[Item], job: dict, tok: Tokenizer, workers: int,
         progress: bool) -> dict[str, ShardWriter]:
    """Tokenise the items (resuming after the shards an earlier run finished) into the writers."""
    mode, dtype = job["mode"], job["dtype"]
    prefixes = {"train": "stream"} if mode == "tokens" else {"train": "train", "heldout": "heldout"}
    done = {s: _finished(out, p) for s, p in prefixes.items()}
    first, before = _restart(done)
    writers = {s: ShardWriter(out, s, p, dtype, job["shard_tokens"], done[s], before[s]) for s, p in prefixes.items()}
    _clean(out, {n for w in writers.values() for r in w.done for n in (r["file"], r["doc_ends"])}
           | {STATE + "/" + r["file"][:-4] + ".json" for w in writers.values() for r in w.done} | {STATE + "/job.json"})
    spool = os.path.join(out, STATE, ".item-") if workers > 1 else None
    tasks = ((items[i], job["tokenizer"]["spec"], job["text_field"], job["heldout_fraction"], mode, dtype,
              spool and f"{spool}{i}") for i in range(first, len(items)))
    pool = _pool(workers)
    t0, n_docs, n_tokens = time.perf_counter(), 0, 0
    try:
        with pool or contextlib.nullcontext(), tqdm(
                total=sum(it.nbytes for it in items), initial=sum(it.nbytes for it in items[:first]), unit="B",
                unit_scale=True, unit_divisor=1024, desc="prepare", file=sys.stderr,
                disable=not progress or sum(it.nbytes for it in items) < 4 << 20,
                mininterval=1.0, dynamic_ncols=True) as bar:
            results = pool.imap(work, tasks) if pool else map(work, tasks)
            for i, (item, res) in enumerate(zip(items[first:], results), start=first):
                ctx = (i, {s: w.pos for s, w in writers.items()})
                for w in writers.values():
                    w.ctx = ctx
                tokens, docs = _feed(item, res, writers, job, tok, bar)
                n_docs, n_tokens = n_docs + docs, n_tokens + tokens
                bar.set_postfix_str(f"{n_docs:,} docs, {n_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s",
                                    refresh=False)
            ctx = (len(items), {s: w.pos for s, w in writers.items()})
            for w in writers.values():
                w.ctx = ctx
                w.close()
    finally:  # on an error: let the background work end before anything is cleaned up
        for w in writers.values():
            w.drain(raise_errors=False)
    return writers


def _entry(r: dict, split: str | None = None) -> dict:
    """A manifest shard entry from a sidecar record."""
    e = {k: r[k] for k in ("file", "split", "tokens", "documents", "max_id", "bytes", "sha256", "doc_ends")}
    if split:
        e["split"] = split
    return e


def _write_whole(out: str, name: str, split: str, ids: np.ndarray, ends: np.ndarray) -> dict:
    """A shard written in one go (the two halves of a shard cut by the token-level split)."""
    data = memoryview(np.ascontiguousarray(ids)).cast("B")
    with atomic_file(os.path.join(out, name + ".idx"), "wb") as g:
        g.write(np.asarray(ends, "<u8").tobytes())
    with atomic_file(os.path.join(out, name + ".bin"), "wb") as g:
        g.write(data)
    return {"file": name + ".bin", "split": split, "tokens": len(ids), "documents": len(ends),
            "max_id": int(ids.max()) if len(ids) else -1, "bytes": data.nbytes,
            "sha256": hashlib.sha256(data).hexdigest(), "doc_ends": name + ".idx"}


def _cut(out: str, recs: list[dict], fraction: float, dtype: str) -> list[dict]:
    """Token-level split (the key rule left a side empty): the last ceil(fraction * n) tokens of the
    stream are held out. The shard holding the cut is rewritten as two new shards (NAME-a, NAME-b)."""
    n = sum(int(r["tokens"]) for r in recs)
    c = n - min(n, max(1, math.ceil(fraction * n)))
    shards, start = [], 0
    for r in recs:
        end = start + int(r["tokens"])
        if end <= c or start >= c:
            shards.append(_entry(r, "train" if end <= c else "heldout"))
        else:
            k, base = c - start, r["file"][:-4]
            ids = np.memmap(os.path.join(out, r["file"]), dtype=S.DTYPES[dtype], mode="r")
            ends = np.fromfile(os.path.join(out, r["doc_ends"]), dtype="<u8").astype(np.int64)
            shards.append(_write_whole(out, base + "-a", "train", ids[:k], ends[ends <= k]))
            shards.append(_write_whole(out, base + "-b", "heldout", ids[k:], ends[ends > k] - k))
            del ids
        start = end
    return shards


def _clean(out: str, keep: set[str]) -> None:
    """Remove every file of ``out`` (and ``out/.prepare``) not in ``keep`` (names relative to ``out``)."""
    for folder in (out, os.path.join(out, STATE)):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            rel = os.path.relpath(os.path.join(folder, name), out).replace(os.sep, "/")
            if rel not in keep and rel != STATE and os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))


# ---- the whole run ---------------------------------------------------------------------------------
def _tokenizer_record(spec: str, tok: Tokenizer) -> dict:
    return {"spec": spec, "fingerprint": tok.fingerprint, "vocab_size": int(tok.vocab_size),
            "eos_id": int(tok.eos_id), "bos_id": tok.bos_id, "pad_id": tok.pad_id}


def _job(inputs: Sequence[str], items: list[Item], tok: Tokenizer, spec: str, shard_tokens: int,
         text_field: str, fraction: float, fmt: str = "auto", id_limit: int | None = None) -> dict:
    """What a run writes is a function of this record (a resumed run must match it)."""
    files = {}
    for it in items:
        for f in it.files:
            st = os.stat(f.path)
            files[f.path] = [st.st_size, st.st_mtime_ns]
    return {"version": S.VERSION, "inputs": list(inputs), "files": files, "tokenizer": _tokenizer_record(spec, tok),
            "dtype": S.dtype_for(max(tok.vocab_size, id_limit or 0)), "shard_tokens": shard_tokens,
            "text_field": text_field, "format": fmt, "id_limit": id_limit,
            "heldout_fraction": float(fraction)}


def _settings(job: dict) -> dict:
    """The part of the job a finished manifest keeps (``prepare``): same settings = already prepared.
    ``files``: a digest of every input file's path, size and mtime (a changed input is not reused)."""
    files = hashlib.sha256(json.dumps(job["files"], sort_keys=True).encode()).hexdigest()
    return {"inputs": job["inputs"], "tokenizer": job["tokenizer"]["fingerprint"], "shard_tokens": job["shard_tokens"],
            "text_field": job["text_field"], "heldout_fraction": job["heldout_fraction"], "files": files,
            "format": job["format"], "id_limit": job["id_limit"]}


def _existing(out: str, job: dict) -> S.Manifest | bool:
    """A finished dataset of the same settings (returned as is), True to resume an unfinished run of the
    same job, False for a fresh run. Anything else in ``out`` is an error (nothing is overwritten)."""
    if not os.path.exists(out):
        return False
    if not os.path.isdir(out):
        raise UserError(f"--out {out} is a file: choose a new output directory")
    if S.is_dataset(out):
        m = S.read_manifest(out)
        if m.data.get("prepare") == _settings(job):
            _clean(out, {S.MANIFEST} | {s[k] for s in m.shards for k in ("file", "doc_ends")})
            shutil.rmtree(os.path.join(out, STATE), ignore_errors=True)
            return m
        raise UserError(f"{out} already holds a prepared dataset of other inputs or settings (or its input files "
                        f"changed since): choose a new --out or remove it")
    try:
        with open(os.path.join(out, STATE, "job.json"), encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    if old is not None:
        if {k: v for k, v in old.items() if k != "mode"} == job:
            return True
        raise UserError(f"{out} holds an unfinished prepare of other inputs or settings (or the inputs changed "
                        f"since): run it again with the same arguments, or remove {out}")
    if os.listdir(out):
        raise UserError(f"--out {out} exists and is not a prepared dataset: choose a new output directory")
    return False


def _manifest(out: str, writers: dict[str, ShardWriter], job: dict) -> dict:
    if job["mode"] == "tokens":
        shards = _cut(out, writers["train"].done, job["heldout_fraction"], job["dtype"])
    else:
        shards = [_entry(r) for s in S.SPLITS if s in writers for r in writers[s].done]
    if not shards:
        raise UserError(f"the inputs {' '.join(job['inputs'])} hold no documents (every file or record is empty): "
                        f"check the inputs and --text-field")
    splits = {s: {"tokens": sum(int(e["tokens"]) for e in shards if e["split"] == s),
                  "documents": sum(int(e["documents"]) for e in shards if e["split"] == s)} for s in S.SPLITS}
    return {"format": S.FORMAT, "version": S.VERSION, "tokenizer": job["tokenizer"], "dtype": job["dtype"],
            "heldout_fraction": job["heldout_fraction"], "split_rule": S.SPLIT_RULE, "shards": shards,
            "splits": splits, "fingerprint": S.fingerprint(job["tokenizer"], job["dtype"], shards),
            "inputs": job["inputs"], "prepare": _settings(job),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def prepare(inputs: Sequence[str], out_dir: str, tokenizer_spec: str = "bytes", workers: int = 1,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, text_field: str = "text", heldout_fraction: float = 0.05,
            progress: bool = True, fmt: str = "auto", id_limit: int | None = None) -> S.Manifest:
    """Tokenise ``inputs`` into a prepared dataset in ``out_dir`` (see the module doc); its manifest.

    ``fmt``: the format of every input file (``DataConfig.format``; "auto": by extension).
    ``id_limit``: check ``.npy`` ids against this vocabulary (a model's) instead of the tokenizer's.
    The progress bar shows only for inputs of 4 MiB and more.

    Run again with the same arguments after a kill, it resumes; on a finished dataset of the same
    settings it returns at once. Bad input is a UserError before anything is written (or, found
    while tokenising, with whatever this run wrote removed)."""
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"--workers {workers} is invalid: use 1 or more worker processes")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise UserError(f"--shard-tokens {shard_tokens} is invalid: use a positive number of tokens per shard")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise UserError(f"--heldout-fraction {heldout_fraction} is invalid: use a fraction in [0, 1]")
    out = os.path.abspath(os.path.expanduser(out_dir))
    tok = load_tokenizer(tokenizer_spec)
    items = plan(inputs, text_field, fmt)
    job = _job(inputs, items, tok, tokenizer_spec, shard_tokens, text_field, heldout_fraction, fmt, id_limit)
    state = _existing(out, job)
    if isinstance(state, S.Manifest):
        return state
    job["mode"] = split_mode(items, heldout_fraction)
    fresh, made = not state, not os.path.exists(out)
    try:
        if fresh:
            os.makedirs(os.path.join(out, STATE), exist_ok=True)
            write_json(os.path.join(out, STATE, "job.json"), {k: v for k, v in job.items() if k != "mode"})
        writers = _run(out, items, job, tok, workers, progress)
        manifest = _manifest(out, writers, job)
        write_json(os.path.join(out, S.MANIFEST), manifest)
    except UserError:
        if fresh:  # bad input found while tokenising: leave nothing behind
            if made:
                shutil.rmtree(out, ignore_errors=True)
            else:
                _clean(out, set())
                shutil.rmtree(os.path.join(out, STATE), ignore_errors=True)
        raise
    _clean(out, {S.MANIFEST} | {s[k] for s in manifest["shards"] for k in ("file", "doc_ends")})
    shutil.rmtree(os.path.join(out, STATE), ignore_errors=True)
    return S.read_manifest(out)
