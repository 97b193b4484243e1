"""Weighted mixtures and the stateless record order: global record index -> (source, record).

``data.mixture`` is a list of ``{source, weight}`` (YAML) or the string ``"A:0.7,B:0.3"``; it is
kept in the config as that canonical string. The order of training records is a pure function
of the global record index ``g`` (batch ``k`` holds ``g`` in ``[k*G, (k+1)*G)``), so a resume
needs only the batch index, whatever the process count:

* **One source** of N records: ``record = index_shuffle(g mod N, seed + g div N)``, grain's
  stateless index shuffle (a fresh permutation per epoch, no array of N indices): the order of
  ``grain.MapDataset.range(N).shuffle(seed).repeat()``.
* **A mixture**: records come in blocks of :data:`BLOCK` = 1024. Every block holds exactly
  ``counts[s]`` records of source ``s`` (largest-remainder apportionment of ``weight * 1024``,
  so each count is within one record of it); slot ``p`` of block ``b`` goes to table entry
  ``pi_b(p)`` (a permutation of 1024 slots seeded by (seed, b): NumPy's generator, 8 KiB per block)
  of the fixed table of sources sorted by index, and
  its place among its source's slots gives the source-local index ``j = b*counts[s] + rank``;
  the source's own per-epoch shuffle maps ``j`` to its record.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from parscale_jax.data.config import canonical_mixture, parse_mixture

__all__ = ["BLOCK", "Sampler", "block_counts", "canonical_mixture", "parse_mixture"]

BLOCK = 1024


def block_counts(weights: Sequence[float], block: int = BLOCK) -> np.ndarray:
    """Records of each source per block: floor(w * block / sum) plus one for the largest
    remainders (ties to the earlier source); they sum to ``block``."""
    w = np.asarray(weights, np.float64)
    exact = w / w.sum() * block
    counts = np.floor(exact).astype(np.int64)
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: block - int(counts.sum())]:
        counts[i] += 1
    return counts


def _seed(*parts: int) -> int:
    h = hashlib.blake2b(b"parscale-mixture:" + ",".join(map(str, parts)).encode(), digest_size=4)
    return int.from_bytes(h.digest(), "little")


class Sampler:
    """Global record index -> (source, record of that source); see the module doc. Stateless and
    picklable; ``weights`` None (or one source) is the plain per-epoch shuffle."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float] | None, seed: int):
        from grain.experimental import index_shuffle  # grain's stateless shuffle (its C++ extension)

        self._shuffle = index_shuffle
        self.sizes = [int(n) for n in sizes]
        self.seed = int(seed)
        self.mixed = weights is not None and len(self.sizes) > 1
        if self.mixed:
            self.counts = block_counts(weights)
            self.starts = np.concatenate([[0], np.cumsum(self.counts)])
            self.source_seed = [_seed(self.seed, s) for s in range(len(self.sizes))]
        else:
            self.counts = np.asarray([BLOCK], np.int64)
            self.source_seed = [self.seed]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_shuffle", "_blocks")}

    def __setstate__(self, d):
        from grain.experimental import index_shuffle

        self.__dict__.update(d)
        self._shuffle = index_shuffle

    def _epoch_shuffle(self, s: int, j: int) -> int:
        n = self.sizes[s]
        epoch, i = divmod(j, n)
        return int(self._shuffle(i, max_index=n - 1, seed=(self.source_seed[s] + epoch) % 2**32, rounds=4))

    def _block(self, b: int) -> np.ndarray:
        """The slot permutation of block ``b`` (1024 entries; the last few blocks cached)."""
        cache = self.__dict__.setdefault("_blocks", {})
        perm = cache.get(b)
        if perm is None:
            if len(cache) > 8:
                cache.clear()
            perm = cache[b] = np.random.default_rng([_seed(self.seed, b), 0x6D6978]).permutation(BLOCK)
        return perm

    def locate(self, g: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(source, record) int64 arrays for the global record indices ``g``."""
        g = [int(x) for x in g]
        src = np.zeros(len(g), np.int64)
        rec = np.zeros(len(g), np.int64)
        for r, x in enumerate(g):
            if not self.mixed:
                rec[r] = self._epoch_shuffle(0, x)
                continue
            b, p = divmod(x, BLOCK)
            slot = int(self._block(b)[p])
            s = int(np.searchsorted(self.starts, slot, side="right")) - 1
            src[r] = s
            rec[r] = self._epoch_shuffle(s, b * int(self.counts[s]) + slot - int(self.starts[s]))
        return src, rec
