"""Evaluation: held-out loss over fixed windows (shared by train.py and eval.py)."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parscale_jax.loss import token_nll


def make_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a 1-D token stream into consecutive non-overlapping windows [n, seq_len]; drop the rest."""
    n = len(tokens) // seq_len
    return np.asarray(tokens[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


def window_loss(model: Any, params: Any, tokens: np.ndarray, seq_len: int, batch_size: int,
                max_windows: int | None = None) -> dict[str, float]:
    """Mean next-token loss over windows of ``seq_len`` tokens, each scored on its seq_len-1 targets.

    Returns {"loss": mean nats per target token, "tokens": number of targets, "windows": n}.
    Windows are batched ``batch_size`` at a time; the last partial batch is padded and masked.
    """
    windows = make_windows(tokens, seq_len)
    if max_windows is not None:
        windows = windows[:max_windows]
    if len(windows) == 0:
        raise ValueError(f"fewer than seq_len={seq_len} tokens to evaluate")

    @jax.jit
    def batch_nll(p, w, keep):
        logits, _ = model.apply({"params": p}, w[:, :-1])
        nll = token_nll(logits, w[:, 1:])
        return jnp.sum(nll * keep[:, None])

    total = 0.0
    for i in range(0, len(windows), batch_size):
        w = windows[i: i + batch_size]
        keep = np.ones(len(w), np.float32)
        if len(w) < batch_size:  # pad to a fixed shape: one compilation
            pad = batch_size - len(w)
            w = np.concatenate([w, np.zeros((pad, seq_len), np.int32)])
            keep = np.concatenate([keep, np.zeros(pad, np.float32)])
        total += float(batch_nll(params, w, keep))
    n_targets = len(windows) * (seq_len - 1)
    return {"loss": total / n_targets, "tokens": n_targets, "windows": len(windows),
            "perplexity": math.exp(min(total / n_targets, 700.0))}
