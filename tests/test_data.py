"""The data pipeline against independent computations: plain-Python packing of the documents,
the record sets of each epoch, the 1-process global batch, the uninterrupted run, a hand walk
of the standard library, `tokenizers`' own encodings and the bytes written to disk."""
from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig

import numpy as np
import pytest

from parscale_jax import data as D
from parscale_jax.errors import UserError

EOS = 258
BYTES = D.ByteTokenizer()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # outside tmp_path: raw sources are prepared into the cache, and a test's corpus may be tmp_path itself
    monkeypatch.setenv("PARSCALE_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))


# ---- independent references ----------------------------------------------------------------
def packed(docs: list[bytes], width: int, eos: int = EOS) -> list[tuple[int, ...]]:
    """Plain Python: every non-empty document followed by EOS, cut into rows of ``width``."""
    ids: list[int] = []
    for d in docs:
        if len(d):
            ids.extend(d)
            ids.append(eos)
    return [tuple(ids[i * width:(i + 1) * width]) for i in range(len(ids) // width)]


def hash_fraction(key: str) -> float:
    """The documented split rule: the first 8 bytes of sha256(key) as a fraction of 2**64."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def take(it, n: int) -> list[np.ndarray]:
    return [next(it)["tokens"] for _ in range(n)]


def record_ids(batches: list[np.ndarray], rows: list[tuple[int, ...]]) -> list[int]:
    """Index into ``rows`` of every row of the batches, in order (fails on a row not in ``rows``)."""
    where = {r: i for i, r in enumerate(rows)}
    assert len(where) == len(rows), "test data must give distinct records"
    return [where[tuple(int(x) for x in row)] for b in batches for row in b]


def write_docs(folder, docs: list[bytes]) -> list[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_bytes(d)
    return docs  # doc00, doc01, ... is also the relative-path order


def random_docs(seed: int, n: int, lo: int = 5, hi: int = 90) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, rng.integers(lo, hi)).astype(np.uint8).tobytes() for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 random binary documents (one empty), all train: 60-odd distinct records of 17 tokens."""
    docs = random_docs(0, 12)
    docs[4] = b""
    folder = tmp_path_factory.mktemp("corpus")
    write_docs(folder, docs)
    cfg = D.DataConfig(source=str(folder), seq_len=16, heldout_fraction=0.0, seed=3, prefetch=2)
    rows = packed(docs, 17)
    return cfg, rows


# ---- packing and shuffling -----------------------------------------------------------------
def test_batches_are_rows_of_the_plain_python_packing_and_cover_each_epoch_once(corpus):
    cfg, rows = corpus
    n, g = len(rows), 5
    assert n % g, "the epoch boundary must fall inside a batch"
    it = D.train_iterator(cfg, BYTES, global_batch=g)
    assert it.num_records == n
    batches = take(it, math.ceil(3 * n / g))
    it.close()
    for b in batches:
        assert b.shape == (g, 17) and b.dtype == np.int32
    ids = record_ids(batches, rows)  # every row is exactly one plain-Python record
    epochs = [ids[e * n:(e + 1) * n] for e in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert epochs[0] != list(range(n)), "not shuffled"
    assert epochs[0] != epochs[1] != epochs[2], "every epoch needs a fresh permutation"

    again = D.train_iterator(cfg, BYTES, global_batch=g)
    assert all((x == y).all() for x, y in zip(take(again, 6), batches[:6])), "same seed, same order"
    again.close()
    other = D.train_iterator(D.DataConfig(**{**cfg.to_dict(), "seed": 4}), BYTES, global_batch=g)
    assert record_ids(take(other, 6), rows) != ids[:6 * g]
    other.close()


def test_process_shards_are_disjoint_and_concatenate_to_the_global_batch(corpus):
    cfg, rows = corpus
    g, steps = 6, 8
    glob_it = D.train_iterator(cfg, BYTES, global_batch=g)
    whole = take(glob_it, steps)
    glob_it.close()
    shards = []
    for p in range(2):
        it = D.train_iterator(cfg, BYTES, global_batch=g, process_index=p, process_count=2)
        shards.append(take(it, steps))
        it.close()
    seen = [set(), set()]
    for k in range(steps):
        assert shards[0][k].shape == (g // 2, 17)
        np.testing.assert_array_equal(np.concatenate([shards[0][k], shards[1][k]]), whole[k])
        if (k + 1) * g <= len(rows):  # within the first epoch no record repeats
            for p in range(2):
                seen[p] |= set(record_ids([shards[p][k]], rows))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    with pytest.raises(UserError, match="does not split over 4 processes"):
        D.train_iterator(cfg, BYTES, global_batch=6, process_index=0, process_count=4)


def test_state_resumes_the_uninterrupted_sequence(corpus):
    cfg, rows = corpus
    g = 4
    ref_it = D.train_iterator(cfg, BYTES, global_batch=g)
    ref = take(ref_it, 30)  # crosses two epoch boundaries (about 64 records)
    ref_it.close()

    it = D.train_iterator(cfg, BYTES, global_batch=g)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # it goes into checkpoints as JSON
    tail = take(it, 5)
    it.close()
    assert state["next_batch"] == 7
    for got, want in zip(tail, ref[7:12]):
        np.testing.assert_array_equal(got, want)

    # a fresh iterator with another prefetch depth, then two processes, continue from batch 7
    fresh = D.train_iterator(D.DataConfig(**{**cfg.to_dict(), "prefetch": 0}), BYTES, global_batch=g)
    fresh.set_state(state)
    got = take(fresh, 20)
    fresh.close()
    for k, b in enumerate(got):
        np.testing.assert_array_equal(b, ref[7 + k])
    halves = []
    for p in range(2):
        h = D.train_iterator(cfg, BYTES, global_batch=g, process_index=p, process_count=2)
        h.set_state(state)
        halves.append(take(h, 3))
        h.close()
    for k in range(3):
        np.testing.assert_array_equal(np.concatenate([halves[0][k], halves[1][k]]), ref[7 + k])

    # the state refuses other data settings with a one-line error
    for change in ({"seed": 1}, {"seq_len": 8}):
        other = D.train_iterator(D.DataConfig(**{**cfg.to_dict(), **change}), BYTES, global_batch=g)
        with pytest.raises(UserError, match="made for other data") as e:
            other.set_state(state)
        assert "\n" not in str(e.value)
        other.close()
    bad = D.train_iterator(cfg, BYTES, global_batch=g)
    with pytest.raises(UserError, match="not one this version wrote"):
        bad.set_state({"next_batch": -1})
    bad.close()


@pytest.mark.multiprocess
def test_state_resumes_across_worker_processes(corpus):
    """grain worker processes (spawned) deliver the same batches, and the state moves between settings."""
    cfg, rows = corpus
    g = 4
    ref_it = D.train_iterator(cfg, BYTES, global_batch=g)
    ref = take(ref_it, 12)
    ref_it.close()
    mp = D.train_iterator(D.DataConfig(**{**cfg.to_dict(), "worker_count": 1, "prefetch": 1}), BYTES,
                          global_batch=g)
    first = take(mp, 5)
    state = mp.get_state()
    mp.close()
    for k in range(5):
        np.testing.assert_array_equal(first[k], ref[k])
    plain = D.train_iterator(D.DataConfig(**{**cfg.to_dict(), "prefetch": 0}), BYTES, global_batch=g)
    plain.set_state(state)
    for k, b in enumerate(take(plain, 7)):
        np.testing.assert_array_equal(b, ref[5 + k])
    plain.close()


# ---- sources ---------------------------------------------------------------------------------
def _stdlib_py_files() -> dict[str, str]:
    """relpath -> path of every *.py of the standard library, by pathlib (not the module's walk)."""
    import pathlib

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    out = {}
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in skip or part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        out[rel.as_posix()] = str(p)
    return out


def test_stdlib_split_is_deterministic_disjoint_and_matches_the_hash_rule():
    cfg = D.DataConfig()
    train, held = D.split_files(cfg)
    assert (train, held) == D.split_files(D.DataConfig()), "split must be deterministic"
    files = _stdlib_py_files()
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(files)

    assert sorted(held) == sorted(k for k in files if hash_fraction(k) < 0.05)
    assert 0.02 < len(held) / len(files) < 0.10
    # raising the fraction only moves files from train to held-out
    _, held10 = D.split_files(D.DataConfig(heldout_fraction=0.10))
    assert set(held) < set(held10)

    # held-out tokens = the held-out files' bytes in relative-path order, each followed by EOS
    tokens, n_bytes = D.heldout_tokens(cfg, BYTES)
    docs = [open(files[k], "rb").read() for k in sorted(held)]
    expect = [t for d in docs if d for t in list(d) + [EOS]]
    np.testing.assert_array_equal(tokens, np.asarray(expect, np.int32))
    assert n_bytes == sum(len(d) for d in docs)

    it = D.train_iterator(D.DataConfig(seq_len=32), BYTES, global_batch=4, process_index=1, process_count=2)
    b = next(it)["tokens"]
    it.close()
    assert b.shape == (2, 33) and b.dtype == np.int32 and 0 <= b.min() and b.max() <= EOS


def test_single_file_splits_by_tokens(tmp_path):
    """One file cannot be split by files: the held-out part is the last ceil(f*n) tokens."""
    doc = random_docs(1, 1, 400, 401)[0]
    (tmp_path / "one.txt").write_bytes(doc)
    cfg = D.DataConfig(source=str(tmp_path / "one.txt"), seq_len=9, heldout_fraction=0.25)
    stream = list(doc) + [EOS]
    n_held = math.ceil(0.25 * len(stream))
    tokens, _ = D.heldout_tokens(cfg, BYTES)
    assert tokens.tolist() == stream[-n_held:]
    it = D.train_iterator(cfg, BYTES, global_batch=3)
    head = stream[:-n_held]
    rows = [tuple(head[i * 10:(i + 1) * 10]) for i in range(len(head) // 10)]
    assert it.num_records == len(rows)
    assert sorted(set(record_ids(take(it, 10), rows))) == list(range(len(rows)))
    it.close()


def test_jsonl_text_field(tmp_path):
    recs = [{"content": "héllo wörld", "id": 1}, {"content": "", "id": 2}, {"content": "line\nbreak\ud800", "id": 3},
            {"content": "x" * 30, "id": 4}]
    lines = [json.dumps(r) for r in recs]
    lines.insert(2, "   ")  # blank lines are skipped
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    cfg = D.DataConfig(source=str(tmp_path / "a.jsonl"), text_field="content", heldout_fraction=1.0, seq_len=4)
    tokens, n_bytes = D.heldout_tokens(cfg, BYTES)
    texts = ["héllo wörld".encode(), "line\nbreak\ufffd".encode(), b"x" * 30]  # lone surrogate -> U+FFFD
    np.testing.assert_array_equal(tokens, [t for d in texts for t in list(d) + [EOS]])
    assert n_bytes == sum(map(len, texts))
    # records are the split units, keyed "relpath:line"
    keys = ["a.jsonl:1", "a.jsonl:2", "a.jsonl:4", "a.jsonl:5"]
    train, held = D.split_files(D.DataConfig(source=str(tmp_path / "a.jsonl"), text_field="content",
                                             heldout_fraction=0.5))
    assert held == [k for k in keys if hash_fraction(k) < 0.5] and train == [k for k in keys if k not in held]
    assert held and train, "pick keys that fall on both sides"

    with pytest.raises(UserError, match=r"line 1: .*no field 'text'.*data.text_field"):
        D.heldout_tokens(D.DataConfig(source=str(tmp_path / "a.jsonl"), heldout_fraction=1.0), BYTES)
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(UserError, match=r"b.jsonl line 2: .*not a string"):
        D.heldout_tokens(D.DataConfig(source=str(tmp_path / "b.jsonl"), heldout_fraction=1.0), BYTES)
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserError, match=r"c.jsonl line 2: unreadable JSONL"):
        D.heldout_tokens(D.DataConfig(source=str(tmp_path / "c.jsonl"), heldout_fraction=1.0), BYTES)


def test_npy_token_ids(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 259, 70).astype(np.int32)
    b = rng.integers(0, 259, 45).astype(np.int64)
    np.save(tmp_path / "b.npy", b)
    np.save(tmp_path / "a.npy", a)
    (tmp_path / "notes.txt").write_text("not matched by the glob")
    cfg = D.DataConfig(source=str(tmp_path / "*.npy"), heldout_fraction=1.0, seq_len=6)
    tokens, _ = D.heldout_tokens(cfg, BYTES)
    np.testing.assert_array_equal(tokens, a.tolist() + [EOS] + b.tolist() + [EOS])  # sorted by name

    train_cfg = D.DataConfig(source=str(tmp_path / "*.npy"), heldout_fraction=0.0, seq_len=6)
    ids = a.tolist() + [EOS] + b.tolist() + [EOS]
    rows = [tuple(ids[i * 7:(i + 1) * 7]) for i in range(len(ids) // 7)]
    it = D.train_iterator(train_cfg, BYTES, global_batch=len(rows))
    assert sorted(record_ids(take(it, 1), rows)) == list(range(len(rows)))
    it.close()

    np.save(tmp_path / "c.npy", np.asarray([1, 2, 300], np.int32))
    with pytest.raises(UserError, match=r"c.npy: token id 300 is outside the tokenizer's vocabulary \[0, 259\)"):
        D.train_iterator(train_cfg, BYTES, global_batch=2)
    np.save(tmp_path / "c.npy", np.asarray([1.0, 2.0]))
    with pytest.raises(UserError, match="wrong npy dtype float64"):
        D.heldout_tokens(cfg, BYTES)


def test_glob_and_directory_sources(tmp_path):
    for rel in ("a/x.txt", "a/b/y.txt", "a/b/c/z.txt", "a/skip.md", "a/.hidden.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    train, held = D.split_files(D.DataConfig(source=str(tmp_path / "a" / "**" / "*.txt"), heldout_fraction=0.0))
    assert train == ["b/c/z.txt", "b/y.txt", "x.txt"] and held == []  # relative to the glob's fixed root
    train, _ = D.split_files(D.DataConfig(source=str(tmp_path / "a"), heldout_fraction=0.0))
    assert train == ["b/c/z.txt", "b/y.txt", "skip.md", "x.txt"]  # a directory: every non-hidden file
    tokens, _ = D.heldout_tokens(D.DataConfig(source=str(tmp_path / "a" / "*" / "*.txt"), heldout_fraction=1.0),
                                 BYTES)
    assert tokens.tolist() == list(b"a/b/y.txt") + [EOS]


def test_non_utf8_bytes_are_encoded_as_bytes(tmp_path):
    raw = b"caf\xe9 \xff\xfe\x80 ok \xc3\xa9\n"
    (tmp_path / "latin.txt").write_bytes(raw)
    cfg = D.DataConfig(source=str(tmp_path / "latin.txt"), heldout_fraction=1.0, seq_len=4)
    tokens, n_bytes = D.heldout_tokens(cfg, BYTES)
    assert tokens.tolist() == list(raw) + [EOS] and n_bytes == len(raw)
    (tmp_path / "z.txt").write_bytes(b"\x00tail")
    tokens, n_bytes = D.all_tokens(D.DataConfig(source=str(tmp_path), heldout_fraction=0.0), BYTES)
    assert tokens.tolist() == list(raw) + [EOS] + list(b"\x00tail") + [EOS] and n_bytes == len(raw) + 5
    it = D.train_iterator(D.DataConfig(source=str(tmp_path), heldout_fraction=0.0, seq_len=4), BYTES, 2)
    rows = packed([raw, b"\x00tail"], 5)
    assert sorted(record_ids(take(it, 2), rows)) == list(range(len(rows)))
    it.close()
    assert BYTES.encode(raw.decode("utf-8", errors="surrogateescape")).tolist() == list(raw)


# ---- Hugging Face tokenizer --------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_tokenizer_json(tmp_path_factory):
    """A byte-level BPE trained here on a few strings (nothing is downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["def f(x):\n    return x + 1\n", "héllo wörld, 你好", "class A:\n    pass\n"] * 10,
                           trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tk.save(str(path))
    return str(path)


def test_hf_tokenizer_round_trip_and_packing(hf_tokenizer_json, tmp_path):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(hf_tokenizer_json)
    ref.encode_special_tokens = True  # the pipeline reads "<|endoftext|>" in a document as text
    tok = D.load_tokenizer(hf_tokenizer_json)
    assert tok.eos_id == ref.token_to_id("<|endoftext|>") and tok.pad_id == ref.token_to_id("<pad>")
    assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)

    text = "def g(y):\n    return 'héllo 你好 😀' <|endoftext|>\n"
    ids = tok.encode(text, parse_special=False)
    assert ids.tolist() == ref.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert tok.count_bytes(ids) == len(text.encode())

    docs = ["class B:\n    x = 1\n", "", "a <|endoftext|> b", "caf\xe9 bytes".encode("latin-1")]
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"d{i}.txt").write_bytes(d.encode() if isinstance(d, str) else d)
    cfg = D.DataConfig(source=str(folder), tokenizer=hf_tokenizer_json, heldout_fraction=1.0, seq_len=4)
    texts = [d if isinstance(d, str) else d.decode("utf-8", errors="replace") for d in docs]
    expect = [t for s in texts if s for t in ref.encode(s, add_special_tokens=False).ids + [tok.eos_id]]
    for _ in range(2):  # the second call reads the token cache
        tokens, _ = D.heldout_tokens(cfg, tok)
        assert tokens.tolist() == expect
    assert len(os.listdir(os.environ["PARSCALE_JAX_CACHE"])) == 1
    assert tok.decode(tokens) == "".join(texts)


def test_hf_tokenizer_errors(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="has no end-of-text token"):
        D.load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "b"}))
    tok = D.load_tokenizer(str(tmp_path))
    assert tok.eos_id == 1 and tok.pad_id == 1 and tok.encode("a b a").tolist() == [0, 1, 0]
    with pytest.raises(UserError, match="not found: pass 'bytes' or the path"):
        D.load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="is not a valid Hugging Face tokenizer.json"):
        D.load_tokenizer(str(tmp_path / "bad.json"))


# ---- user errors -----------------------------------------------------------------------------------
def test_missing_and_empty_data_give_one_line_user_errors(tmp_path):
    cases = []
    missing = str(tmp_path / "nope")
    cases.append((lambda: D.split_files(D.DataConfig(source=missing)), f"data source {missing} does not exist"))
    cases.append((lambda: D.split_files(D.DataConfig(source=str(tmp_path / "*.zzz"))), "matches no files"))
    (tmp_path / "empty_dir").mkdir()
    cases.append((lambda: D.split_files(D.DataConfig(source=str(tmp_path / "empty_dir"))), "holds no"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_bytes(b"")
    (tmp_path / "blank" / "b.jsonl").write_bytes(b"\n")
    blank = D.DataConfig(source=str(tmp_path / "blank"), heldout_fraction=0.0)
    cases.append((lambda: D.train_iterator(blank, BYTES, 2), "data source .*blank is empty"))
    cases.append((lambda: D.heldout_tokens(D.DataConfig(source=str(tmp_path / "blank"), heldout_fraction=1.0),
                                           BYTES), "data source .*blank is empty"))
    (tmp_path / "short.txt").write_bytes(b"abc")
    cases.append((lambda: D.train_iterator(D.DataConfig(source=str(tmp_path / "short.txt"), heldout_fraction=0.0,
                                                        seq_len=8), BYTES, 2), "fewer than one sequence"))
    cases.append((lambda: D.heldout_tokens(D.DataConfig(heldout_fraction=0.0), BYTES), "no held-out data"))
    cases.append((lambda: D.train_iterator(D.DataConfig(heldout_fraction=1.0), BYTES, 2), "nothing is left"))
    cases.append((lambda: D.DataConfig(seq_len=0), r"data.seq_len=0 is invalid"))
    cases.append((lambda: D.DataConfig(format="csv"), r"data.format='csv' is invalid: use one of"))
    cases.append((lambda: D.DataConfig(heldout_fraction=1.5), r"data.heldout_fraction=1.5 is invalid"))
    cases.append((lambda: D.DataConfig.from_dict({"sorce": "x"}), "unknown data option.* sorce"))
    cases.append((lambda: D.train_iterator(D.DataConfig(), BYTES, 0), "global batch 0 is invalid"))
    for fn, pattern in cases:
        with pytest.raises(UserError, match=pattern) as e:
            fn()
        assert "\n" not in str(e.value) and ": " in str(e.value)


def test_config_round_trip():
    cfg = D.DataConfig(source="x/*.txt", seq_len=64, seed=9, worker_count=2)
    assert D.DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
