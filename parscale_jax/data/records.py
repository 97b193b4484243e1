"""Training records of prepared datasets (``manifest.json`` + token shards, :mod:`.shards`).

A run's data is one prepared dataset or a weighted mixture of several. A raw source (``stdlib``,
a file, directory or glob of text / JSONL / ``.npy``) is prepared once into the cache
(``$PARSCALE_JAX_CACHE/prepared/<key>``), keyed by what can be known without reading the corpus:
its files' relative paths, sizes and modification times, the format, text field, tokenizer
fingerprint and held-out fraction. So there is one data path, and starting a run reads the
manifest(s) only: records are read from the shards when a batch needs them.

Record ``r`` of a dataset is tokens ``[r*(L+1), (r+1)*(L+1))`` of its train split (L =
``data.seq_len``), the tail shorter than a record dropped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Any, Iterator

import numpy as np

from parscale_jax.data import mixture as MX
from parscale_jax.data import prepare as PR
from parscale_jax.data import shards as SH
from parscale_jax.data.config import DataConfig
from parscale_jax.data.sources import list_files
from parscale_jax.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from parscale_jax.data.tokens import cache_dir
from parscale_jax.errors import UserError

_PREPARED_KEY_VERSION = 1


def _get(m: Any, key: str) -> Any:
    return m[key] if isinstance(m, dict) else getattr(m, key)


def is_prepared(path: str) -> bool:
    return os.path.isdir(path) and SH.is_dataset(path)


def raw_key(cfg: DataConfig, tok: Tokenizer, id_limit: int | None = None) -> str:
    """The cache key of a raw source: O(number of files), no byte of them read."""
    files = []
    for f in list_files(cfg):
        st = os.stat(f.path)
        files.append([f.relpath, f.format, st.st_size, st.st_mtime_ns])
    blob = json.dumps([_PREPARED_KEY_VERSION, os.path.abspath(cfg.source) if cfg.source != "stdlib" else "stdlib",
                       cfg.format, cfg.text_field, tok.fingerprint, float(cfg.heldout_fraction), id_limit, files])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    import fcntl

    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # another process (host) preparing the same source waits
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepared_dir(cfg: DataConfig, tok: Tokenizer | None = None, log=None, id_limit: int | None = None) -> str:
    """The prepared dataset of ``cfg.source``: the directory itself when it holds a manifest,
    else the cache entry of the raw source (prepared now if missing; ``tok``: ``cfg.tokenizer``
    loaded, loaded here when None). ``id_limit``: check ``.npy`` ids against it (a model's
    vocabulary) instead of the tokenizer's."""
    if is_prepared(cfg.source):
        return os.path.abspath(cfg.source)
    key = raw_key(cfg, tok or load_tokenizer(cfg.tokenizer), id_limit)
    root = cache_dir()
    if root is None:
        root = tempfile.mkdtemp(prefix="parscale-prepared-")
    out = os.path.join(root, "prepared", key)
    if is_prepared(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with _file_lock(out + ".lock"):
        if not is_prepared(out):
            if log:
                log(f"preparing data source {cfg.source} into {out} (once)")
            try:
                PR.prepare([cfg.source], out, cfg.tokenizer, workers=1, text_field=cfg.text_field, fmt=cfg.format,
                           heldout_fraction=cfg.heldout_fraction, progress=log is not None, id_limit=id_limit)
            except UserError as e:
                if "hold no documents" in str(e):
                    raise UserError(f"data source {cfg.source} is empty (no text or token ids in its files): "
                                    f"add data or point data.source elsewhere") from None
                raise
    return out


@dataclasses.dataclass
class Source:
    """One prepared dataset opened for reading: the manifest only; the token shards are opened
    (memory-mapped) on the first read, also after pickling into a grain worker."""
    name: str            # as the config names it
    path: str            # the prepared directory
    manifest: Any
    seq_len: int

    def __post_init__(self):
        self._streams: dict[str, Any] = {}

    @property
    def width(self) -> int:
        return self.seq_len + 1

    @property
    def fingerprint(self) -> str:
        return str(_get(self.manifest, "fingerprint"))

    @property
    def tokenizer_info(self) -> dict:
        return dict(_get(self.manifest, "tokenizer"))

    @property
    def max_id(self) -> int:
        return int(self.manifest.max_id)

    def split_tokens(self, split: str) -> int:
        return int(self.manifest.split_tokens(split))

    @property
    def num_records(self) -> int:
        return self.split_tokens("train") // self.width

    def stream(self, split: str = "train"):
        s = self._streams.get(split)
        if s is None:
            s = self._streams[split] = SH.open_split(self.path, self.manifest, split)
        return s

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_streams"}

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._streams = {}

    def rows(self, records: np.ndarray) -> np.ndarray:
        """Records ``records`` as int32 [n, seq_len + 1]; only their bytes are read."""
        st, w = self.stream("train"), self.width
        out = np.empty((len(records), w), np.int32)
        for i, r in enumerate(records):
            out[i] = st.read(int(r) * w, (int(r) + 1) * w)
        return out


def _with_source(cfg: DataConfig, source: str) -> DataConfig:
    return dataclasses.replace(cfg, source=source, mixture=None)


def open_sources(cfg: DataConfig, tok: Tokenizer | None = None, log=None) -> tuple[list[Source], list[float] | None]:
    """(the run's sources, their weights or None for a single source); manifests only."""
    spec = MX.parse_mixture(cfg.mixture) if cfg.mixture else [(cfg.source, None)]
    out = []
    for name, _ in spec:
        if not os.path.exists(name) and name != "stdlib" and not any(c in name for c in "*?["):
            raise UserError(f"data source {name} does not exist: give a prepared dataset directory "
                            f"(python -m parscale_jax.data prepare ...), a file, directory or glob")
        path = prepared_dir(_with_source(cfg, name), tok, log)
        out.append(Source(name, path, SH.read_manifest(path), cfg.seq_len))
    for s in out:  # every shard there with its manifest size: a stat each, no byte read
        for sh in s.manifest.shards:
            SH.check_shard_file(os.path.join(s.path, sh["file"]), int(sh["bytes"]))
    fps = {s.tokenizer_info.get("fingerprint") for s in out}
    if len(fps) > 1:
        raise UserError(f"the mixture's sources were prepared with different tokenizers ({', '.join(sorted(map(str, fps)))}): "
                        f"prepare every source with the same --tokenizer")
    return out, ([w for _, w in spec] if cfg.mixture else None)


def dataset_tokenizer(src: Source, fallback: Tokenizer | None = None) -> Tokenizer | None:
    """The tokenizer a prepared dataset was made with (for decoding and bits per byte): the byte
    tokenizer, the manifest's tokenizer.json when it is still there and matches, else ``fallback``
    when its fingerprint matches; None when unknown."""
    info = src.tokenizer_info
    fp = info.get("fingerprint")
    if fallback is not None and fallback.fingerprint == fp:
        return fallback
    if info.get("spec") == "bytes" or fp == ByteTokenizer.fingerprint:
        return ByteTokenizer()
    try:
        tok = load_tokenizer(str(info.get("spec")))
    except UserError:
        return None
    return tok if tok.fingerprint == fp else None


def check_vocab(sources: list[Source], vocab_size: int) -> None:
    """The manifests' largest token id against the model's vocabulary (no token read)."""
    for s in sources:
        if s.max_id >= vocab_size:
            raise UserError(f"data source {s.name}: token id {s.max_id} (its manifest's largest) is outside the "
                            f"model's vocabulary [0, {vocab_size}): raise model.vocab_size to at least "
                            f"{s.max_id + 1}, or prepare the data with the model's tokenizer")


def heldout_streams(sources: list[Source]) -> list[tuple[str, Any]]:
    """(source name, held-out split stream) of every source with held-out tokens; nothing read."""
    return [(s.name, s.stream("heldout")) for s in sources if s.split_tokens("heldout")]


def eval_source(cfg: DataConfig, tok: Tokenizer | None, split: str, vocab_size: int | None = None,
                log=None) -> tuple[Source, Any]:
    """(the prepared dataset of ``cfg.source``, the stream to score): its held-out split, or with
    ``split="all"`` every document (a raw source prepared with nothing held out; a prepared
    dataset's train then held-out shards). Ids are checked against ``vocab_size`` (the
    manifest's largest) when given. Nothing of the corpus is read here."""
    if split == "heldout" and cfg.heldout_fraction <= 0 and not is_prepared(cfg.source):
        raise UserError("data.heldout_fraction is 0, so there is no held-out data: set it above 0 "
                        "(e.g. 0.05) or evaluate on another source")
    if split == "all" and not is_prepared(cfg.source):
        cfg = dataclasses.replace(cfg, heldout_fraction=0.0)
    path = prepared_dir(cfg, tok, log, id_limit=vocab_size)
    src = Source(cfg.source, path, SH.read_manifest(path), cfg.seq_len)
    if vocab_size is not None:
        check_vocab([src], vocab_size)
    if split == "heldout":
        stream = src.stream("heldout")
    else:
        m = src.manifest
        stream = SH.ShardStream(path, m.dtype, m.shards_of("train") + m.shards_of("heldout"))
    if len(stream) == 0:
        raise UserError(f"the {'held-out split' if split == 'heldout' else 'data'} of {cfg.source} is empty: "
                        f"add data" + (" or raise data.heldout_fraction" if split == "heldout" else ""))
    return src, stream


def heldout_tokens(cfg: DataConfig, tok: Tokenizer, vocab_size: int | None = None) -> tuple[np.ndarray, int]:
    """The held-out split read whole (small corpora, tests, scripts: evaluation reads window by
    window through :func:`eval_source`): (1-D int32 tokens, text bytes they encode)."""
    _, stream = eval_source(cfg, tok, "heldout", vocab_size)
    a = stream.read(0, len(stream))
    return a, int(tok.count_bytes(a))


def all_tokens(cfg: DataConfig, tok: Tokenizer, vocab_size: int | None = None) -> tuple[np.ndarray, int]:
    """Like :func:`heldout_tokens` for every document of the source, whatever the split."""
    _, stream = eval_source(cfg, tok, "all", vocab_size)
    a = stream.read(0, len(stream))
    return a, int(tok.count_bytes(a))


def fingerprint(sources: list[Source]) -> str:
    """One fingerprint of the run's datasets (their manifests' fingerprints, in order)."""
    if len(sources) == 1:
        return sources[0].fingerprint
    return hashlib.sha256(json.dumps([[s.name, s.fingerprint] for s in sources]).encode()).hexdigest()


def check_trainable(src: Source) -> None:
    w = src.width
    n = src.split_tokens("train")
    if n == 0:
        raise UserError(f"the training split of data source {src.name} is empty (no text or token ids in it): "
                        f"add data or point data.source elsewhere")
    if n < w:
        raise UserError(f"the training split of {src.name} has {n} tokens, fewer than one sequence "
                        f"(seq_len + 1 = {w}): add data or lower data.seq_len")
