"""Evaluation: held-out loss over fixed windows (shared by train.py and eval.py) and
multiple-choice scoring the lm-evaluation-harness way. Models come from :mod:`parscale_jax.loading`.

* :func:`heldout_loss` (built on :func:`window_loss`) is the one held-out loss: eval.py and the
  training loop both call it on a prepared dataset's held-out split (``data.heldout_streams``),
  reading only the windows they score.
* :func:`choice_accuracy` scores each choice by its summed log-likelihood given the context.
"""
from __future__ import annotations

import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parscale_jax.errors import UserError
from parscale_jax.loss import sequence_nll, token_nll


def make_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a 1-D token stream into consecutive non-overlapping windows [n, seq_len]; drop the rest."""
    n = len(tokens) // seq_len
    return np.asarray(tokens[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


class _Array:
    """A 1-D array as a token stream (``len`` and ``read(start, stop)``, like a prepared split's)."""

    def __init__(self, a: Any):
        self.a = np.asarray(a).reshape(-1)

    def __len__(self) -> int:
        return len(self.a)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.a[start:stop], dtype=np.int32)


def _stream(tokens: Any) -> Any:
    return tokens if hasattr(tokens, "read") else _Array(tokens)


def _window_batches(stream: Any, seq_len: int, batch_size: int, max_windows: int | None):
    """(number of windows, iterator of [<=batch_size, seq_len] int32 windows): only the windows
    scored are read from the stream."""
    n = len(stream) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)

    def gen():
        for i in range(0, n, batch_size):
            k = min(batch_size, n - i)
            yield stream.read(i * seq_len, (i + k) * seq_len).reshape(k, seq_len)
    return n, gen()


@functools.partial(jax.jit, static_argnums=0)
def _windows_nll(model: Any, params: Any, windows: jax.Array, keep: jax.Array) -> jax.Array:
    """Summed next-token NLL of the kept windows [B, L] (inputs w[:, :-1], targets w[:, 1:]):
    the train step's loss (chunked LM head, no full logits)."""
    return jnp.sum(sequence_nll(model, params, windows) * keep[:, None])


def window_loss(model: Any, params: Any, tokens: Any, seq_len: int, batch_size: int,
                max_windows: int | None = None, on_batch: Any = None) -> dict[str, float]:
    """Mean next-token loss over windows of ``seq_len`` tokens, each scored on its seq_len-1 targets.

    ``tokens``: a 1-D array or a stream with ``len`` and ``read(start, stop)`` (a prepared split):
    only the windows scored are read. Returns {"loss": mean nats per target token, "perplexity",
    "tokens": number of targets, "windows": n, "nll": summed nats}. Windows are batched
    ``batch_size`` at a time; the last partial batch is padded and masked, so one compilation
    serves every call with the same model and shapes (the compiled function is cached per model:
    a training loop can call this at every eval). ``on_batch(windows)`` sees each batch read.
    """
    n_win, batches = _window_batches(_stream(tokens), seq_len, batch_size, max_windows)
    if n_win == 0:
        raise ValueError(f"fewer than seq_len={seq_len} tokens to evaluate")
    total = 0.0
    for w in batches:
        if on_batch is not None:
            on_batch(w)
        keep = np.ones(len(w), np.float32)
        if len(w) < batch_size:  # pad to a fixed shape: one compilation
            pad = batch_size - len(w)
            w = np.concatenate([w, np.zeros((pad, seq_len), np.int32)])
            keep = np.concatenate([keep, np.zeros(pad, np.float32)])
        total += float(_windows_nll(model, params, w, keep))
    n_targets = n_win * (seq_len - 1)
    return {"loss": total / n_targets, "tokens": n_targets, "windows": n_win, "nll": total,
            "perplexity": math.exp(min(total / n_targets, 700.0))}


def heldout_loss(model: Any, params: Any, tokens: Any, seq_len: int, batch_size: int,
                 max_windows: int | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """The held-out loss report of eval.py *and* the training loop: :func:`window_loss` plus bits
    per byte.

    ``tokens`` is the held-out stream: a prepared dataset's held-out split
    (``data.heldout_streams``), read window by window, or a 1-D array.
    Returns {"loss", "perplexity", "bits_per_byte", "tokens", "windows", "bytes", "nll"}; bits per
    byte is ``loss * tokens / (ln 2 * bytes)`` over the bytes of text behind the scored targets
    (``tokenizer.count_bytes``: exact for the byte tokenizer, the decoded length for others;
    None without a tokenizer or when the targets hold no text).
    """
    counted, held = [0], []  # the byte tokenizer counts per batch; others decode the scored targets at once

    def count(w):
        if getattr(tokenizer, "name", None) == "bytes":
            counted[0] += int(tokenizer.count_bytes(w[:, 1:]))
        else:
            held.append(w[:, 1:].reshape(-1))

    res = window_loss(model, params, tokens, seq_len, batch_size, max_windows,
                      on_batch=count if tokenizer is not None else None)
    n_bytes = None
    if tokenizer is not None:
        n_bytes = counted[0] + (int(tokenizer.count_bytes(np.concatenate(held))) if held else 0)
    return {**res, "bytes": n_bytes, "bits_per_byte": bits_per_byte(res["loss"], res["tokens"], n_bytes)}


# ---- bits per byte -------------------------------------------------------------------------
def bits_per_byte(loss: float, n_targets: int, n_bytes: int | None) -> float | None:
    """bpb = loss_nats * n_targets / (ln 2 * n_bytes_scored); None when no byte count is known."""
    if not n_bytes:
        return None
    return loss * n_targets / (math.log(2.0) * n_bytes)


def scored_targets(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """The target ids :func:`window_loss` scores (1-D, in order): every window without its first token."""
    w = make_windows(tokens, seq_len)
    if max_windows is not None:
        w = w[:max_windows]
    return w[:, 1:].reshape(-1)


# ---- multiple-choice scoring (the lm-evaluation-harness way) -------------------------------
def load_tasks(path: str) -> list[dict]:
    """Read a JSONL of ``{"context": str, "choices": [str, ...], "answer": int}`` records.

    A malformed record is a UserError naming the file and line.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read task file {path} ({e.strerror}): check the --tasks path") from None
    records = []
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where}: not valid UTF-8: task files are UTF-8 JSONL") from None
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise UserError(f"{where}: not valid JSON ({e}): each line must be one JSON record") from None
            if not isinstance(r, dict):
                raise UserError(f"{where}: a record must be a JSON object with context, choices, answer")
            missing = [k for k in ("context", "choices", "answer") if k not in r]
            if missing:
                raise UserError(f"{where}: record lacks {missing}: each record needs context, choices, answer")
            if not isinstance(r["context"], str):
                raise UserError(f"{where}: context must be a string")
            ch = r["choices"]
            if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
                raise UserError(f"{where}: choices must be a list of at least 2 non-empty strings")
            a = r["answer"]
            if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(ch):
                raise UserError(f"{where}: answer={a!r} must be an integer index into choices (0..{len(ch) - 1})")
            records.append({"context": r["context"], "choices": list(ch), "answer": a})
    if not records:
        raise UserError(f"task file {path} holds no records: one JSON record per line")
    return records


def encode_pair(tokenizer: Any, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness does: a trailing space of the context moves
    to the continuation, and the continuation is the tail of encode(context + choice). An empty
    context becomes [EOS] (documents follow EOS in training), so the first choice token is scored."""
    n_sp = len(context) - len(context.rstrip(" "))
    if n_sp:
        context, choice = context[:-n_sp], context[-n_sp:] + choice
    if not context:
        return [int(tokenizer.eos_id)], [int(t) for t in tokenizer.encode(choice)]
    whole = [int(t) for t in tokenizer.encode(context + choice)]
    ctx = [int(t) for t in tokenizer.encode(context)]
    if whole[: len(ctx)] != ctx:  # tokenisation across the boundary differs: encode apart
        return ctx, [int(t) for t in tokenizer.encode(choice)]
    return ctx, whole[len(ctx):]


def choice_requests(records: list[dict], tokenizer: Any, max_len: int) -> list[tuple[list[int], int]]:
    """Per (record, choice): (token sequence of at most max_len + 1 tokens, number of choice tokens
    scored at its end). The context is truncated from the left to fit the model's positions."""
    reqs = []
    for r in records:
        for c in r["choices"]:
            ctx, cont = encode_pair(tokenizer, r["context"], c)
            full = (ctx + cont)[-(max_len + 1):]
            reqs.append((full, min(len(cont), len(full) - 1)))
    return reqs


@functools.partial(jax.jit, static_argnums=0)
def _sequences_ll(model: Any, params: Any, x: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
    """Per row: sum of log p(y_t | x_<=t) over the positions where w is 1."""
    logits, _ = model.apply({"params": params}, x)
    return -jnp.sum(token_nll(logits, y) * w, axis=1)


def score_sequences(model: Any, params: Any, reqs: list[tuple[list[int], int]], batch_size: int,
                    pad_id: int = 0, progress: Any = None, bucket: int = 64) -> np.ndarray:
    """Summed log-likelihood of the last ``n`` tokens of each sequence given what precedes them.

    Sequences are sorted longest first (as the harness does) and batched ``batch_size`` at a time;
    each batch is right-padded to its longest sequence rounded up to a multiple of ``bucket``
    (causal attention: padding after a token never affects it), so there is one compilation
    per length bucket. Results come back in the order of ``reqs``.
    """
    order = sorted(range(len(reqs)), key=lambda i: -len(reqs[i][0]))
    limit = model.cfg.max_position_embeddings
    out = np.zeros(len(reqs), np.float64)
    for b in range(0, len(order), batch_size):
        idx = order[b: b + batch_size]
        longest = len(reqs[idx[0]][0]) - 1
        L = max(1, min(-(-longest // bucket) * bucket, max(limit, longest)))
        x = np.full((batch_size, L), pad_id, np.int32)  # fixed batch size: one compilation per L
        y = np.zeros((batch_size, L), np.int32)
        w = np.zeros((batch_size, L), np.float32)
        for row, i in enumerate(idx):
            seq, n = reqs[i]
            m = len(seq) - 1
            x[row, :m], y[row, :m] = seq[:-1], seq[1:]
            w[row, m - n: m] = 1.0
        out[idx] = np.asarray(_sequences_ll(model, params, x, y, w))[: len(idx)]
        if progress:
            progress(min(b + batch_size, len(reqs)), len(reqs))
    return out


def choice_accuracy(model: Any, params: Any, records: list[dict], tokenizer: Any, batch_size: int,
                    max_len: int | None = None, progress: Any = None) -> dict[str, Any]:
    """acc (argmax of summed log-likelihood) and acc_norm (argmax of log-likelihood per character
    of the choice, the harness's acc_norm), with standard errors, over ``records``.

    Also returns "loglik": the summed log-likelihood of every (record, choice), in order.
    """
    max_len = model.cfg.max_position_embeddings if max_len is None else max_len
    reqs = choice_requests(records, tokenizer, max_len)
    pad = getattr(tokenizer, "pad_id", None)
    ll = score_sequences(model, params, reqs, batch_size, 0 if pad is None else int(pad), progress)
    acc, acc_norm, i = [], [], 0
    for r in records:
        k = len(r["choices"])
        s = ll[i: i + k]
        i += k
        nchars = np.array([max(1, len(c)) for c in r["choices"]], np.float64)
        acc.append(float(np.argmax(s) == r["answer"]))
        acc_norm.append(float(np.argmax(s / nchars) == r["answer"]))
    n = len(records)

    def stderr(v):
        return float(np.std(v, ddof=1) / math.sqrt(n)) if n > 1 else 0.0

    return {"acc": float(np.mean(acc)), "acc_stderr": stderr(acc), "acc_norm": float(np.mean(acc_norm)),
            "acc_norm_stderr": stderr(acc_norm), "n": n, "loglik": ll}
