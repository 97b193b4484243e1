"""``DataConfig``: the ``data.*`` keys of a training config (validated when built)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from parscale_jax.errors import UserError

FORMATS = ("auto", "text", "jsonl", "npy", "parquet", "arrow")


def _fix(why: str) -> UserError:
    return UserError(f"data.mixture is invalid: {why}: give a list of {{source, weight}} or 'A:0.7,B:0.3' "
                     f"with positive weights")


def parse_mixture(spec: Any) -> list[tuple[str, float]]:
    """[(source, weight)] of a mixture given as YAML (list of {source, weight}) or ``"A:0.7,B:0.3"``."""
    if isinstance(spec, str):
        items = []
        for part in spec.split(","):
            if not part.strip():
                continue
            src, sep, w = part.strip().rpartition(":")
            if not sep or not src:
                raise _fix(f"{part.strip()!r} is not SOURCE:WEIGHT")
            items.append({"source": src, "weight": w})
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        raise _fix(f"{spec!r} is neither a list nor a string")
    out = []
    for it in items:
        if not isinstance(it, dict) or set(it) != {"source", "weight"}:
            raise _fix(f"entry {it!r} is not {{source, weight}}")
        src, w = it["source"], it["weight"]
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise _fix(f"weight {w!r} of {src} is not a number") from None
        if isinstance(it["weight"], bool) or not math.isfinite(w) or w <= 0:
            raise _fix(f"weight {it['weight']!r} of {src} is not positive")
        if not isinstance(src, str) or not src:
            raise _fix(f"source {src!r} is not a path")
        out.append((src, w))
    if not out:
        raise _fix("it names no source")
    dup = sorted({s for s, _ in out if [x for x, _ in out].count(s) > 1})
    if dup:
        raise _fix(f"source {dup[0]} is listed twice")
    return out


def canonical_mixture(spec: Any) -> str | None:
    """The config's form of a mixture: ``"A:0.7,B:0.3"`` (None stays None)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "null", "none")):
        return None
    return ",".join(f"{s}:{w!r}" for s, w in parse_mixture(spec))


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
    mixture: Any = None         # weighted sources: a list of {source, weight} or "A:0.7,B:0.3" (kept in that form)

    def __post_init__(self):
        def bad(key, why):
            raise UserError(f"data.{key}={getattr(self, key)!r} is invalid: {why}")

        if not isinstance(self.source, str) or not self.source:
            bad("source", "give 'stdlib' or a file, directory or glob")
        if self.format not in FORMATS:
            bad("format", f"use one of {', '.join(FORMATS)}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            bad("seq_len", "use an integer >= 2 (a sequence needs an input and a next-token target)")
        if not isinstance(self.heldout_fraction, (int, float)) or not 0.0 <= self.heldout_fraction <= 1.0:
            bad("heldout_fraction", "use a fraction in [0, 1] (1 holds everything out: evaluation only)")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            bad("seed", "use an integer in [0, 2**32)")
        if not isinstance(self.worker_count, int) or self.worker_count < 0:
            bad("worker_count", "use 0 (in-process) or a positive number of worker processes")
        if not isinstance(self.prefetch, int) or self.prefetch < 0:
            bad("prefetch", "use 0 (no prefetch) or a positive number of batches")
        object.__setattr__(self, "mixture", canonical_mixture(self.mixture))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown data option(s) {', '.join(unknown)}: known are {', '.join(sorted(known))}")
        return cls(**d)

