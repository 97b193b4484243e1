"""``python -m parscale_jax.data inspect --config CFG [key=value ...] [--batches N]``: what a training
config will feed, before a pod is spent on it.

The run's sources (a prepared dataset, a raw source prepared into the cache, or a mixture), the
share of each source in the tokens of the first N global training batches (``mixture_share``,
read from the batches themselves: exact block counts make it the weights to within a record per
1024), and one decoded sample row.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from parscale_jax import train_config
from parscale_jax.data.iterator import train_iterator
from parscale_jax.data.records import dataset_tokenizer
from parscale_jax.errors import UserError


def preview_config(config: str, overrides: list[str], batches: int = 8) -> dict[str, Any]:
    """The figures ``inspect --config`` prints (and writes with --json)."""
    if batches < 1:
        raise UserError(f"--batches {batches} is invalid: use a positive number of batches")
    cfg = train_config.load(config, overrides)
    it = train_iterator(cfg.data, None, cfg.batch_size)
    try:
        srcs = np.concatenate([next(it)["source"] for _ in range(batches)])
        # the first batch again, for its first row (a fresh iterator: the same stateless order)
        it.set_state({**it.get_state(), "next_batch": 0})
        first = next(it)
    finally:
        it.close()
    per_row = cfg.data.seq_len  # every row holds seq_len training targets
    counts = np.bincount(srcs, minlength=len(it.sources))
    total = int(counts.sum()) * per_row
    weights = it.weights or [1.0]
    tok = dataset_tokenizer(it.sources[0])
    row = first["tokens"][0]
    return {"config": config, "overrides": list(overrides), "batches": batches, "batch_size": cfg.batch_size,
            "seq_len": cfg.data.seq_len, "tokens": total,
            "sources": [{"source": s.name, "dir": s.path, "weight": w, "train_records": s.num_records,
                         "train_tokens": s.split_tokens("train"), "heldout_tokens": s.split_tokens("heldout"),
                         "fingerprint": s.fingerprint} for s, w in zip(it.sources, weights)],
            "mixture_share": {s.name: int(c) * per_row / total for s, c in zip(it.sources, counts)},
            "sample": {"source": it.sources[int(first["source"][0])].name, "ids": row[:64].tolist(),
                       "text": tok.decode(row) if tok is not None else None}}


def print_preview(info: dict[str, Any]) -> None:
    print(f"{info['config'] or 'defaults'} {' '.join(info['overrides'])}: first {info['batches']} batches of "
          f"{info['batch_size']} x {info['seq_len']} tokens ({info['tokens']:,} tokens)")
    for s in info["sources"]:
        share = info["mixture_share"][s["source"]]
        print(f"  {s['source']}: weight {s['weight']:g}, share {share:.4f}; {s['train_records']:,} records, "
              f"{s['train_tokens']:,} train / {s['heldout_tokens']:,} held-out tokens ({s['dir']})")
    text = info["sample"]["text"]
    shown = repr(text[:400]) if text is not None else f"ids {info['sample']['ids']} (tokenizer unknown)"
    print(f"  sample row (from {info['sample']['source']}): {shown}")
