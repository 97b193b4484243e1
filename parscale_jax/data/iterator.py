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
from parscale_jax.data.mixture import Sampler
from parscale_jax.data.records import Source, check_trainable, fingerprint, is_prepared, open_sources
from parscale_jax.data.tokenizer import Tokenizer
from parscale_jax.errors import UserError

_STATE_VERSION = 2
_ENDLESS = 2**62  # batches: the stream never ends


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
    """Global batch index -> this process's rows of tokens (a picklable grain map): global records
    ``[k*G + lo, k*G + hi)`` located by the stateless sampler, read from their sources. Only this
    process's rows are read."""

    def __init__(self, sources: list[Source], sampler: Sampler, global_batch: int, lo: int, hi: int):
        self.sources, self.sampler, self.global_batch, self.lo, self.hi = sources, sampler, global_batch, lo, hi

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        g = np.arange(self.lo, self.hi, dtype=np.int64) + int(k) * self.global_batch
        src, rec = self.sampler.locate(g)
        out = np.empty((len(g), self.sources[0].width), np.int32)
        for s in np.unique(src):
            pick = src == s
            out[pick] = self.sources[int(s)].rows(rec[pick])
        return {"tokens": out, "source": src.astype(np.int32)}


class DataIterator:
    """Infinite iterator of {"tokens": int32 [global_batch // process_count, seq_len + 1],
    "source": int32 [same rows]: the mixture source of each row}.

    Batch k holds global records g in [k*G, (k+1)*G), each mapped to (source, record) by the
    stateless :class:`~parscale_jax.data.mixture.Sampler` (one source: a fresh shuffle of its
    records per epoch, seed + epoch); this process gets rows
    [process_index*local, (process_index+1)*local). ``get_state()`` is {"next_batch": k, ...};
    ``set_state`` rebuilds the pipeline from batch k, so the next batch equals the
    uninterrupted run's, whatever the prefetch depth, worker count or process count.
    """

    def __init__(self, cfg: DataConfig, sources: list[Source], weights: list[float] | None, global_batch: int,
                 process_index: int, process_count: int):
        self.cfg, self.global_batch = cfg, global_batch
        self.sources, self.weights = sources, weights
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = global_batch // process_count
        self.width = cfg.seq_len + 1
        self.num_records = sum(s.num_records for s in sources)
        self.train_tokens = sum(s.split_tokens("train") for s in sources)
        self.sampler = Sampler([s.num_records for s in sources], weights, cfg.seed)
        self._rows = _LocalRows(sources, self.sampler, global_batch, process_index * self.local_batch,
                                (process_index + 1) * self.local_batch)
        self._it = None
        self._start(0)

    def _start(self, next_batch: int) -> None:
        import grain

        self.close()
        ds = grain.MapDataset.range(next_batch, _ENDLESS).map(self._rows).to_iter_dataset(
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

    @property
    def fingerprint(self) -> str:
        """The datasets' fingerprint (their manifests'): recorded in every checkpoint."""
        return fingerprint(self.sources)

    def _fingerprint(self) -> dict[str, Any]:
        return {"seed": self.cfg.seed, "seq_len": self.cfg.seq_len, "global_batch": self.global_batch,
                "num_records": self.num_records, "train_tokens": self.train_tokens,
                "fingerprint": self.fingerprint, "mixture": self.cfg.mixture}

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "next_batch": self._next_batch, **self._fingerprint()}

    def set_state(self, state: dict[str, Any], data_changed: bool = False) -> None:
        """Continue at the state's batch. The state must be for this data (seed, seq_len, global
        batch, datasets, mixture) unless ``data_changed`` (a resume that accepted a changed dataset
        or mixture: the record order is stateless, so the batch index is all that carries over).
        A version-1 state (written before prepared datasets) is taken when its record and token
        counts match: the same records."""
        nb = state.get("next_batch") if isinstance(state, dict) else None
        version = state.get("version") if isinstance(state, dict) else None
        if version not in (1, _STATE_VERSION) or \
                not isinstance(nb, numbers.Integral) or isinstance(nb, bool) or nb < 0:
            raise UserError(f"data iterator state {str(state)[:120]!r} is not one this version wrote: "
                            f"resume from a checkpoint written by parscale_jax, or start the data afresh")
        mine = self._fingerprint()
        keys = ("seed", "seq_len", "global_batch") if data_changed else tuple(mine)
        if version == 1:
            keys = tuple(k for k in keys if k not in ("fingerprint", "mixture"))
        diff = [f"{k} {state.get(k)} -> {mine[k]}" for k in keys if state.get(k) != mine[k]]
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


def train_iterator(cfg: DataConfig, tokenizer: Tokenizer | None, global_batch: int, process_index: int = 0,
                   process_count: int = 1, log=None) -> DataIterator:
    """Infinite, shuffled, packed training batches for this process (see DataIterator) of the
    prepared dataset(s) of ``cfg`` (a raw source is prepared into the cache first: ``log`` says so)."""
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
    if cfg.heldout_fraction >= 1 and not cfg.mixture and not is_prepared(cfg.source):
        raise UserError("data.heldout_fraction is 1, so nothing is left to train on: use a fraction below 1 "
                        "(default 0.05)")
    sources, weights = open_sources(cfg, tokenizer, log)
    for src in sources:
        check_trainable(src)
    return DataIterator(cfg, sources, weights, global_batch, process_index, process_count)
