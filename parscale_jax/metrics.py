"""What the user sees during training: progress lines (or a bar on a terminal), metrics in
``workdir/metrics.jsonl`` and TensorBoard event files in ``workdir/tb``. Only process 0 writes."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._f = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._f = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
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
    try:
        import numpy as np

        if isinstance(v, np.generic) or (hasattr(v, "shape") and getattr(v, "shape", None) == ()):
            v = v.item()
    except Exception:
        pass
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return v


def fmt_duration(s: float) -> str:
    s = max(0, int(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """One line per ``log_every`` steps (a redrawn bar when stderr is a terminal):
    step/total, loss, tokens/s, MFU, ETA."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.total, self.start, self.enabled = total, start, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = None
        self.s0 = start

    def begin(self, step: int) -> None:
        """Start the clock (after the first, compiling step)."""
        self.t0, self.s0 = time.perf_counter(), step

    def update(self, step: int, loss: float, tokens_per_s: float | None, mfu: float | None,
               extra: str = "") -> None:
        if not self.enabled:
            return
        eta = ""
        if self.t0 is not None and step > self.s0:
            rate = (time.perf_counter() - self.t0) / (step - self.s0)
            eta = f" eta {fmt_duration(rate * (self.total - step))}"
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        tps = f" {tokens_per_s:,.0f} tok/s" if tokens_per_s else ""
        m = f" mfu {100 * mfu:.1f}%" if mfu is not None else ""
        line = f"[{bar}] step {step}/{self.total} loss {loss:.4f}{tps}{m}{eta}{extra}"
        if self.tty:
            sys.stderr.write("\r" + line + "\033[K")
            sys.stderr.flush()
        else:
            print(line, file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r\033[K")
        print(text, file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
