"""The training iterator: shuffled, packed, checkpointable global batches (grain), split by process.

The iterator state is the index of the next global batch (plus what it depends on), so it is a
small JSON dict that survives a change of process count, worker count or prefetch depth.

Grain's worker processes (``data.worker_count``) die with the trainer: each watches its parent
and exits when it is gone, also after a kill -9 that leaves no chance to close them (grain 0.2.18
offers no such option of its own; its ``worker_init_fn`` starts the watch).
"""
from __future__ import annotations

import numbers
import os
import threading
import time
from typing import Any, Iterator

import numpy as np
from absl import flags

from parscale_jax.data.config import DataConfig
from parscale_jax.data.tokenizer import Tokenizer
from parscale_jax.data.tokens import TokenStream, _split_streams
from parscale_jax.errors import UserError

_STATE_VERSION = 1


def _exit_with_parent(worker_index: int = 0, worker_count: int = 1, poll_s: float = 0.25) -> None:
    """In a worker process: a daemon thread that ends the process once its parent is gone (it is
    then re-parented, so ``getppid`` changes). Picklable by reference for grain's ``worker_init_fn``."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="parscale-exit-with-parent", daemon=True).start()


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
        import grain  # heavy (it imports jax): only the iterator needs it, not configs, sources or tokens

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
            if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags: their defaults
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.cfg.worker_count, per_worker_buffer_size=max(1, self.cfg.prefetch)),
                worker_init_fn=_exit_with_parent)
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
