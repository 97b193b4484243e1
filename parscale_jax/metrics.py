"""What the user sees: the one progress display (tqdm) for training, evaluation and generation;
training metrics in ``workdir/metrics.jsonl`` and TensorBoard event files in ``workdir/tb``
(only process 0 writes). A run resumed from step s first drops the records past s (JSONL
rewritten atomically; TensorBoard told to purge them), so every step is recorded once."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

from parscale_jax.fileio import write_text


def drop_records_after(path: str, step: int) -> int:
    """Rewrite the JSONL at ``path`` without the records of steps past ``step`` (and a torn last
    line); returns how many were dropped."""
    if not os.path.isfile(path):
        return 0
    keep, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and int(rec.get("step", 0)) <= step
            except (ValueError, TypeError):
                ok = False
            if ok:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        write_text(path, "".join(keep))
    return dropped


class MetricsWriter:
    """``metrics.jsonl`` and TensorBoard of a run; ``resume_step``: the run continues a checkpoint
    of that step, so later records of an earlier attempt are dropped first."""

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self._f = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None:
            drop_records_after(path, resume_step)
        self._f = open(path, "a", buffering=1)
        try:
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge)
        except Exception as e:  # TensorBoard is a convenience; the JSONL is the record
            print(f"warning: TensorBoard logging disabled ({e})", file=sys.stderr)

    def write(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "time": round(time.time(), 3)}
        rec.update({k: _plain(v) for k, v in metrics.items() if v is not None})
        self._f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic) or (hasattr(v, "shape") and getattr(v, "shape", None) == ()):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return v


def progress_values(loss: float, tokens_per_s: float | None, mfu: float | None) -> dict[str, str | None]:
    """What a training progress line shows besides the step."""
    return {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}" if tokens_per_s else None,
            "mfu": f"{100 * mfu:.1f}%" if mfu is not None else None}


def fmt_duration(s: float) -> str:
    s = max(0, int(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """The one progress display (tqdm), for training steps, scored sequences and generated tokens.

    On a terminal a live tqdm bar; otherwise (logs, CI) one line per update formatted by tqdm's
    own meter, at most every ``min_interval`` seconds (and always at the end). The clock starts
    at :meth:`begin` (training calls it after the compiling step, so rate and ETA are the steady
    ones); ``update(n, key=value, ...)`` shows ``n`` of ``total`` and the values.
    """

    LINE = "{desc}{n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, total: int, start: int = 0, unit: str = "step", desc: str = "", enabled: bool = True,
                 min_interval: float = 0.0):
        self.total, self.start, self.unit, self.enabled = total, start, unit, enabled
        self.desc = f"{desc}: " if desc else ""
        self.tty = enabled and sys.stderr.isatty()
        self.min_interval = min_interval
        self._bar: tqdm | None = None
        self._t0: float | None = None
        self._s0 = start
        self._last = -math.inf

    def begin(self, step: int | None = None) -> None:
        """Start the clock at ``step`` (default: the start)."""
        self._s0 = self.start if step is None else step
        self._t0 = time.perf_counter()
        if self.tty and self._bar is None:
            self._bar = tqdm(total=self.total, initial=self._s0, unit=self.unit, desc=self.desc.rstrip(": "),
                             file=sys.stderr, smoothing=0, dynamic_ncols=True)

    def update(self, n: int, **values: Any) -> None:
        if not self.enabled:
            return
        if self._t0 is None:
            self.begin()
        postfix = {k: v for k, v in values.items() if v is not None}
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n - self._bar.n)
            return
        now = time.perf_counter()
        if now - self._last < self.min_interval and n < self.total:
            return
        self._last = now
        post = ", ".join(f"{k}={v}" for k, v in postfix.items())
        print(tqdm.format_meter(n, self.total, now - self._t0, prefix=self.desc, unit=self.unit,
                                initial=self._s0, postfix=post, bar_format=self.LINE),
              file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
