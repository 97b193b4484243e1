"""Training records of prepared datasets and weighted mixtures (parscale_jax.data.records / .mixture).

The datasets here are written by a minimal writer of the on-disk contract in this file (flat
little-endian ids + manifest.json), not by ``prepare``, so reading is checked on its own. Each
record's tokens encode (source, record), so which record a row is can be read off the row itself.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from parscale_jax import data as D
from parscale_jax.data import mixture as MX
from parscale_jax.data import shards as SH
from parscale_jax.errors import UserError

SEQ = 7           # records of 8 tokens
W = SEQ + 1


def write_dataset(folder: Path, train: np.ndarray, heldout: np.ndarray | None = None, shard_tokens: int = 1000,
                  version: int = 1, vocab_size: int = 259) -> str:
    """A prepared dataset of the given token streams (byte tokenizer record), split into shards."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for split, ids in (("train", train), ("heldout", heldout)):
        if ids is None:
            continue
        for i, lo in enumerate(range(0, len(ids), shard_tokens)):
            part = np.asarray(ids[lo: lo + shard_tokens], "<u2")
            name = f"{split}-{i:05d}"
            (folder / f"{name}.bin").write_bytes(part.tobytes())
            (folder / f"{name}.idx").write_bytes(np.asarray([len(part)], "<u8").tobytes())
            shards.append({"file": f"{name}.bin", "split": split, "tokens": len(part), "documents": 1,
                           "max_id": int(part.max()), "bytes": 2 * len(part),
                           "sha256": hashlib.sha256(part.tobytes()).hexdigest(), "doc_ends": f"{name}.idx"})
    tok = {"spec": "bytes", "fingerprint": "bytes-v1", "vocab_size": vocab_size, "eos_id": 258, "bos_id": 257,
           "pad_id": 256}
    manifest = {"format": "parscale-tokens", "version": version, "tokenizer": tok, "dtype": "uint16",
                "heldout_fraction": 0.0, "split_rule": "", "shards": shards,
                "splits": {s: {"tokens": sum(x["tokens"] for x in shards if x["split"] == s),
                               "documents": sum(1 for x in shards if x["split"] == s)} for s in ("train", "heldout")},
                "fingerprint": hashlib.sha256(json.dumps([tok, "uint16", shards], sort_keys=True).encode()).hexdigest(),
                "inputs": [], "created": "test"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def tagged(source: int, n_records: int, tail: int = 3) -> np.ndarray:
    """Records whose tokens are [source, record // 250, record % 250, ...]: a row names itself."""
    r = np.arange(n_records)
    rows = np.zeros((n_records, W), np.int64)
    rows[:, 0], rows[:, 1], rows[:, 2] = source, r // 250, r % 250   # n_records <= 62500
    rows[:, 3:] = (r[:, None] * 7 + np.arange(W - 3)) % 250
    return np.concatenate([rows.reshape(-1), np.full(tail, 1)])  # a tail shorter than a record: dropped


def ident(rows: np.ndarray) -> list[tuple[int, int]]:
    return [(int(r[0]), int(r[1]) * 250 + int(r[2])) for r in rows]


SIZES = (12000, 10007, 10009)  # grain's index shuffle is slow below ~10k records
WEIGHTS = (0.5, 0.3, 0.2)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return [write_dataset(root / f"s{i}", tagged(i, n), heldout=tagged(i, 3)) for i, n in enumerate(SIZES)]


def mix_cfg(paths, weights=WEIGHTS, **kw) -> D.DataConfig:
    spec = ",".join(f"{p}:{w}" for p, w in zip(paths, weights))
    return D.DataConfig(mixture=spec, seq_len=SEQ, prefetch=kw.pop("prefetch", 0), **kw)


def take(it, n):
    return [next(it)["tokens"] for _ in range(n)]


def test_block_shares_are_exact_and_each_source_is_shuffled_per_epoch(three):
    g = 256
    it = D.train_iterator(mix_cfg(three, seed=11), None, g)
    rows = np.concatenate(take(it, 12))   # 3072 records: 3 blocks of 1024
    ids = ident(rows)
    for b in range(3):
        blk = [s for s, _ in ids[b * 1024:(b + 1) * 1024]]
        for s, w in enumerate(WEIGHTS):
            assert abs(blk.count(s) - w * 1024) < 1, (b, s, blk.count(s))
    # each source: over whole blocks its draws are its local indices [0, 3*count) mapped by a
    # permutation of its records per epoch -> every record q or q+1 times, (3*count) mod n of them q+1
    for s, n in enumerate(SIZES):
        drawn = 3 * int(MX.block_counts(WEIGHTS)[s])
        times = np.bincount([r for src, r in ids if src == s], minlength=n)
        q = drawn // n
        assert set(times.tolist()) <= {q, q + 1} and int((times == q + 1).sum()) == drawn % n, (s, times)
    again = np.concatenate(take(D.train_iterator(mix_cfg(three, seed=11), None, g), 12))
    other = np.concatenate(take(D.train_iterator(mix_cfg(three, seed=12), None, g), 12))
    assert np.array_equal(rows, again) and not np.array_equal(rows, other)


def test_block_counts_largest_remainder():
    for w in ([0.5, 0.3, 0.2], [1, 1, 1], [0.001, 1.0], [3, 5, 7, 11]):
        c = MX.block_counts(w)
        exact = np.asarray(w, float) / sum(w) * 1024
        assert c.sum() == 1024 and np.all(np.abs(c - exact) < 1), (w, c)


def test_one_source_is_the_grain_shuffle_of_before(tmp_path):
    """One source: the order of grain.MapDataset.range(N).shuffle(seed).repeat() (the previous
    pipeline), so a raw corpus trains on the same batches as before."""
    import grain

    n, g = 23, 5
    path = write_dataset(tmp_path / "one", tagged(0, n))
    it = D.train_iterator(D.DataConfig(source=path, seq_len=SEQ, seed=4, prefetch=1), None, g)
    got = [r for rows in take(it, 14) for _, r in ident(rows)]
    ref = grain.MapDataset.range(n).shuffle(seed=4).repeat()
    assert got == [ref[j] for j in range(14 * g)]


def test_two_processes_read_disjoint_rows_forming_the_global_batch(tmp_path):
    """Sources larger than a block's draws of them: within block 0 no record repeats, so the
    records each process reads can be compared as sets."""
    paths = [write_dataset(tmp_path / f"b{i}", tagged(i, n)) for i, n in enumerate((20000, 15000, 12000))]
    g, k = 64, 16                                    # 16 batches of 64: block 0
    whole = take(D.train_iterator(mix_cfg(paths), None, g), k)
    parts = [take(D.train_iterator(mix_cfg(paths), None, g, process_index=p, process_count=2), k) for p in (0, 1)]
    for i in range(k):
        assert np.array_equal(np.concatenate([parts[0][i], parts[1][i]]), whole[i])
    seen = [ident(np.concatenate(parts[p])) for p in (0, 1)]
    assert len(set(seen[0])) == len(seen[0]) == 512 and len(set(seen[1])) == 512
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(ident(np.concatenate(whole)))


def test_resume_from_state_any_process_count_and_changed_weights(three):
    g = 32
    cfg = mix_cfg(three, prefetch=2)
    ref = take(D.train_iterator(cfg, None, g), 40)
    it = D.train_iterator(cfg, None, g)
    take(it, 17)
    state = it.get_state()
    assert state["next_batch"] == 17 and state["mixture"] == cfg.mixture
    json.dumps(state)
    halves = []
    for p in (0, 1):
        h = D.train_iterator(cfg, None, g, process_index=p, process_count=2)
        h.set_state(state)
        halves.append(take(h, 23))
    for k in range(23):
        assert np.array_equal(np.concatenate([halves[0][k], halves[1][k]]), ref[17 + k])
    changed = mix_cfg(three, weights=(0.2, 0.3, 0.5))
    other = D.train_iterator(changed, None, g)
    with pytest.raises(UserError, match="other data.*mixture"):
        other.set_state(state)
    other.set_state(state, data_changed=True)    # a resume that accepted the change: position kept
    assert other.next_batch == 17
    rows = np.concatenate(take(other, 48))       # from batch 17: records 544..2079 (block 1 whole)
    blk = [s for s, _ in ident(rows[1024 - 544: 2048 - 544])]
    assert [blk.count(s) for s in range(3)] == list(MX.block_counts((0.2, 0.3, 0.5)))


def test_start_reads_only_the_manifest_and_the_first_batches(tmp_path, monkeypatch):
    """Counting every token read from the shards: opening the data reads none, the first batch
    reads at most its rows (plus the prefetched ones)."""
    n = 20000                                   # 160k tokens in 40 shards
    path = write_dataset(tmp_path / "big", tagged(0, n), heldout=tagged(0, 100), shard_tokens=4000)
    read = []
    real = SH.ShardStream.read

    def counting(self, start, stop):
        read.append(min(stop, len(self)) - start)
        return real(self, start, stop)

    monkeypatch.setattr(SH.ShardStream, "read", counting)
    g, prefetch = 4, 2
    cfg = D.DataConfig(source=path, seq_len=SEQ, prefetch=prefetch)
    it = D.train_iterator(cfg, None, g)
    D.check_vocab(it.sources, 259)
    D.heldout_streams(it.sources)
    first = next(it)["tokens"]
    import time
    time.sleep(0.3)                              # let the prefetch thread run as far as it goes
    it.close()
    assert first.shape == (g, W)
    assert 0 < sum(read) <= (prefetch + 2) * g * W, sum(read)   # not the corpus (160k tokens)


def test_bad_input_one_line(three, tmp_path):
    cases = []
    cases.append((lambda: mix_cfg(three, weights=(0.5, 0, 0.5)), r"data.mixture is invalid: weight '0' .* not positive"))
    cases.append((lambda: mix_cfg(three, weights=(0.5, -1, 0.5)), r"not positive"))
    cases.append((lambda: D.DataConfig(mixture=f"{three[0]}:x"), r"is not a number"))
    cases.append((lambda: D.DataConfig(mixture=f"{three[0]}:1,{three[0]}:2"), r"listed twice"))
    missing = str(tmp_path / "nosuch")
    cases.append((lambda: D.train_iterator(D.DataConfig(mixture=f"{three[0]}:1,{missing}:1", seq_len=SEQ), None, 2),
                  f"data source {missing} does not exist"))
    hi = write_dataset(tmp_path / "hi", np.full(100, 400), vocab_size=1000)
    it = D.train_iterator(D.DataConfig(source=hi, seq_len=SEQ, prefetch=0), None, 2)
    cases.append((lambda: D.check_vocab(it.sources, 384), r"token id 400 .* outside the model's vocabulary \[0, 384\)"))
    newer = write_dataset(tmp_path / "newer", tagged(0, 10), version=2)
    cases.append((lambda: D.train_iterator(D.DataConfig(source=newer, seq_len=SEQ), None, 2), "format version 2, newer"))
    for fn, pat in cases:
        with pytest.raises(UserError, match=pat) as e:
            fn()
        assert "\n" not in str(e.value)
    cut = write_dataset(tmp_path / "cut", tagged(0, 300), shard_tokens=1000)
    opened = lambda: D.train_iterator(D.DataConfig(source=cut, seq_len=SEQ, prefetch=0), None, 300)  # noqa: E731
    with open(Path(cut) / "train-00001.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match=r"train-00001.bin has 100 bytes, the manifest says 2000"):
        opened()
    (Path(cut) / "train-00001.bin").unlink()
    with pytest.raises(UserError, match=r"train-00001.bin is missing: restore it"):
        opened()


def test_heldout_is_read_window_by_window(three, monkeypatch):
    """Evaluation scores a held-out split through its stream: the windows scored, nothing else."""
    from parscale_jax import evaluate as E

    src = D.open_sources(D.DataConfig(source=three[0], seq_len=SEQ))[0][0]
    stream = dict(D.heldout_streams([src]))[three[0]]
    asked = []
    real = stream.read
    monkeypatch.setattr(stream, "read", lambda a, b: asked.append((a, b)) or real(a, b))
    n, batches = E._window_batches(stream, 4, 2, 3)
    got = np.concatenate(list(batches))
    want = tagged(0, 3)[:12].reshape(3, 4)
    assert n == 3 and np.array_equal(got, want) and asked == [(0, 8), (8, 12)]
    assert dataclasses.is_dataclass(src) and math.isfinite(len(stream))
