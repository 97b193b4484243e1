"""``python -m parscale_jax.data prepare`` / ``inspect DIR``: the token shards and manifest of a prepared dataset.

Expected token streams are computed here independently (bytes + EOS per document, the split's
sha256 rule written out again, the tokenizers library called directly), never read back from the
code under test. The kill -9 test runs this module as a helper process (``python tests/test_prepare.py``)
with every shard's completion slowed, so the kill lands mid-run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from parscale_jax.data import shards as S
from parscale_jax.data.__main__ import main
from parscale_jax.data.prepare import prepare
from parscale_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 258

DOCS = ["def f(x):\n    return x + 1\n", "héllo wörld, 你好\n", "", "a literal <|endoftext|> inside\n",
        "class A:\n    pass\n" * 7, "x" * 300, "\n", "the last one"] + [f"doc {i}: " + "ab" * i for i in range(40)]


def held(key: str, fraction: float) -> bool:
    """The split rule, written out again: sha256(key)[:8] as a fraction of 2**64 below the fraction."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") < fraction * 2.0**64


def byte_stream(docs) -> np.ndarray:
    out = []
    for d in docs:
        b = d.encode() if isinstance(d, str) else d
        if b:
            out += list(b) + [EOS]
    return np.asarray(out, np.int64)


def split_stream(m: S.Manifest, split: str) -> np.ndarray:
    """The split's tokens read with plain np.fromfile, shard by shard (not through ShardStream)."""
    parts = [np.fromfile(os.path.join(m.dir, s["file"]), dtype=m.dtype) for s in m.shards_of(split)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0,), np.int64)


def files_of(d: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name), "rb") as f:
            data = f.read()
        if name == S.MANIFEST:
            obj = json.loads(data)
            obj.pop("created")   # the only field that differs between two runs of the same job
            data = json.dumps(obj, sort_keys=True).encode()
        out[name] = data
    return out


# ---- inputs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The same documents as text files, JSONL, Parquet (3 row groups) and a saved `datasets` folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("inputs")
    text = root / "text"
    text.mkdir()
    for i, d in enumerate(DOCS):
        (text / f"doc{i:03d}.txt").write_bytes(d.encode())
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    pq.write_table(pa.table({"id": list(range(len(DOCS))), "text": DOCS}), root / "docs.parquet", row_group_size=20)
    import datasets

    datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))}).save_to_disk(str(root / "hfds"))
    return {"text": str(text), "jsonl": str(root / "docs.jsonl"), "parquet": str(root / "docs.parquet"),
            "datasets": str(root / "hfds"), "root": str(root)}


@pytest.fixture(scope="module")
def hf_tokenizer_json(tmp_path_factory):
    """A byte-level BPE trained here on a few strings (nothing is downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(DOCS * 3, trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tk.save(str(path))
    return str(path)


@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet", "datasets"])
def test_same_documents_same_tokens_from_every_format(inputs, fmt, tmp_path):
    m = prepare([inputs[fmt]], str(tmp_path / "out"), "bytes", shard_tokens=700, heldout_fraction=0.0,
                progress=False)
    want = byte_stream(DOCS)
    assert np.array_equal(split_stream(m, "train"), want)
    assert m.split_tokens("heldout") == 0 and m.split_documents("train") == sum(1 for d in DOCS if d)
    assert m.data["dtype"] == "uint16" and m.max_id == int(want.max())
    # every document ends with EOS where the .idx says, and nowhere else; sha256 and sizes as recorded
    ends = []
    start = 0
    for s in m.shards_of("train"):
        ends += [start + int(e) for e in S.doc_ends(m.dir, s)]
        start += s["tokens"]
        data = open(os.path.join(m.dir, s["file"]), "rb").read()
        assert len(data) == s["bytes"] == 2 * s["tokens"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    assert ends == [int(i) + 1 for i in np.flatnonzero(want == EOS)]
    assert m.fingerprint == S.fingerprint(m.tokenizer, "uint16", m.shards)


def test_hf_tokenizer_formats_and_two_workers(inputs, hf_tokenizer_json, tmp_path):
    """A tokenizer.json: text and Parquet give the tokenizers library's ids (specials read as text), also
    tokenised by 2 worker processes."""
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(hf_tokenizer_json)
    ref.encode_special_tokens = True
    eos = ref.token_to_id("<|endoftext|>")
    want = [t for d in DOCS if d for t in ref.encode(d, add_special_tokens=False).ids + [eos]]
    a = prepare([inputs["text"]], str(tmp_path / "a"), hf_tokenizer_json, heldout_fraction=0.0, progress=False)
    b = prepare([inputs["parquet"]], str(tmp_path / "b"), hf_tokenizer_json, workers=2, heldout_fraction=0.0,
                shard_tokens=100, progress=False)
    assert split_stream(a, "train").tolist() == want == split_stream(b, "train").tolist()
    assert a.tokenizer["eos_id"] == eos and a.tokenizer["fingerprint"].startswith("hf-")


def test_split_by_unit_key_and_one_or_two_workers(inputs, tmp_path):
    """Units are files, JSONL lines, Parquet/Arrow rows; held out by the key rule; the output of 1 and 2
    worker processes is byte-identical (the manifest's creation time aside)."""
    f = 0.3
    srcs = [inputs["text"], inputs["jsonl"], inputs["parquet"], inputs["datasets"]]
    one = prepare(srcs, str(tmp_path / "w1"), "bytes", workers=1, shard_tokens=500, heldout_fraction=f,
                  progress=False)
    two = prepare(srcs, str(tmp_path / "w2"), "bytes", workers=2, shard_tokens=500, heldout_fraction=f,
                  progress=False)
    assert files_of(one.dir) == files_of(two.dir)
    keys = ([f"doc{i:03d}.txt" for i in range(len(DOCS))] + [f"docs.jsonl:{i + 1}" for i in range(len(DOCS))]
            + [f"docs.parquet:{i}" for i in range(len(DOCS))]
            + [f"data-00000-of-00001.arrow:{i}" for i in range(len(DOCS))])
    docs = DOCS * 4
    for split, side in (("train", False), ("heldout", True)):
        want = byte_stream([d for k, d in zip(keys, docs) if held(k, f) == side])
        assert np.array_equal(split_stream(one, split), want)
        stream = S.open_split(one.dir, one, split)   # memmap reads across shard boundaries
        assert len(stream) == len(want) and len(one.shards_of(split)) > 1
        for lo, hi in ((0, len(want)), (450, 1234), (499, 501), (len(want) - 3, len(want) + 5)):
            assert np.array_equal(stream.read(lo, hi), want[lo:hi]) and stream.read(lo, hi).dtype == np.int32
    assert one.split_documents("heldout") == sum(1 for k, d in zip(keys, docs) if d and held(k, f))


def test_token_level_split_when_the_rule_leaves_a_side_empty(tmp_path):
    """One file: the held-out part is the last ceil(f * n) tokens; the shard holding the cut is rewritten in two."""
    (tmp_path / "one.txt").write_bytes(b"0123456789\n" * 100)
    m = prepare([str(tmp_path / "one.txt")], str(tmp_path / "o"), "bytes", shard_tokens=300, heldout_fraction=0.1,
                progress=False)
    full = byte_stream([b"0123456789\n" * 100])
    h = math.ceil(0.1 * len(full))
    assert np.array_equal(split_stream(m, "train"), full[:-h]) and np.array_equal(split_stream(m, "heldout"), full[-h:])
    assert m.split_documents("train") == 0 and m.split_documents("heldout") == 1
    assert sorted(os.listdir(m.dir)) == sorted([S.MANIFEST] + [s[k] for s in m.shards for k in ("file", "doc_ends")])


def test_npy_token_ids_are_copied_not_retokenised(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 259, size=5000).astype(np.int32)
    b = rng.integers(0, 259, size=1234).astype(np.uint16)
    os.makedirs(tmp_path / "ids")
    np.save(tmp_path / "ids" / "a.npy", a.reshape(50, 100))
    np.save(tmp_path / "ids" / "b.npy", b)
    m = prepare([str(tmp_path / "ids")], str(tmp_path / "o"), "bytes", shard_tokens=999, heldout_fraction=0.0,
                progress=False)
    want = np.concatenate([a, [EOS], b, [EOS]])
    assert np.array_equal(split_stream(m, "train"), want) and m.split_documents("train") == 2
    # the 5000-token document spans shards: only the shard where it ends lists its end
    assert [list(S.doc_ends(m.dir, s)) for s in m.shards_of("train")] == [[], [], [], [], [], [5001 - 4995],
                                                                           [6236 - 5994]]
    np.save(tmp_path / "bad.npy", np.asarray([1, 2, 300], np.int32))
    with pytest.raises(UserError, match="token id 300 is outside"):
        prepare([str(tmp_path / "bad.npy")], str(tmp_path / "o2"), "bytes", progress=False)
    assert not os.path.exists(tmp_path / "o2")
    np.save(tmp_path / "bad16.npy", np.asarray([1, 2, 259], np.uint16))   # the kernel-copy path checks too
    with pytest.raises(UserError, match="token id 259 is outside"):
        prepare([str(tmp_path / "bad16.npy")], str(tmp_path / "o2"), "bytes", progress=False)
    assert not os.path.exists(tmp_path / "o2")
    # ids checked against a model's vocabulary instead (evaluation): 300 fits 384, 400 does not
    m = prepare([str(tmp_path / "bad.npy")], str(tmp_path / "o3"), "bytes", heldout_fraction=0.0, id_limit=384,
                progress=False)
    assert split_stream(m, "train").tolist() == [1, 2, 300, EOS]
    np.save(tmp_path / "bad.npy", np.asarray([400], np.int32))
    with pytest.raises(UserError, match="token id 400 is outside the model's vocabulary"):
        prepare([str(tmp_path / "bad.npy")], str(tmp_path / "o4"), "bytes", id_limit=384, progress=False)


def test_a_saved_dataset_dict_is_its_splits_in_name_order(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "bc"]}),
                          "test": datasets.Dataset.from_dict({"text": ["xyz"]})}).save_to_disk(str(tmp_path / "dd"))
    m = prepare([str(tmp_path / "dd")], str(tmp_path / "o"), "bytes", heldout_fraction=0.0, progress=False)
    assert np.array_equal(split_stream(m, "train"), byte_stream(["xyz", "a", "bc"]))   # no metadata .json read


def test_format_overrides_the_extension(inputs, tmp_path):
    m = prepare([inputs["jsonl"]], str(tmp_path / "o"), "bytes", heldout_fraction=0.0, fmt="text", progress=False)
    assert np.array_equal(split_stream(m, "train"), byte_stream([open(inputs["jsonl"], "rb").read()]))


def test_rerun_of_a_finished_dataset_returns_it_and_other_settings_are_refused(inputs, tmp_path):
    m = prepare([inputs["jsonl"]], str(tmp_path / "o"), "bytes", progress=False)
    before = files_of(m.dir)
    again = prepare([inputs["jsonl"]], str(tmp_path / "o"), "bytes", progress=False)
    assert again.fingerprint == m.fingerprint and files_of(m.dir) == before
    with pytest.raises(UserError, match="already holds a prepared dataset of other"):
        prepare([inputs["jsonl"]], str(tmp_path / "o"), "bytes", heldout_fraction=0.5, progress=False)
    changed = tmp_path / "changed.txt"
    changed.write_text("one")
    prepare([str(changed)], str(tmp_path / "c"), "bytes", progress=False)
    changed.write_text("two, longer")
    with pytest.raises(UserError, match="input files changed since"):
        prepare([str(changed)], str(tmp_path / "c"), "bytes", progress=False)


# ---- inspect and bad input -------------------------------------------------------------------------
def run_cli(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_inspect_figures_and_json(inputs, tmp_path, capsys):
    m = prepare([inputs["text"]], str(tmp_path / "o"), "bytes", shard_tokens=400, heldout_fraction=0.2,
                progress=False)
    rc, out, _ = run_cli(["inspect", m.dir, "--verify", "--json", str(tmp_path / "i.json")], capsys)
    assert rc == 0 and "verified" in out
    info = json.loads((tmp_path / "i.json").read_text())
    n_train = len(byte_stream([d for i, d in enumerate(DOCS) if not held(f"doc{i:03d}.txt", 0.2)]))
    assert info["splits"]["train"]["tokens"] == n_train
    assert info["tokens"] == len(byte_stream(DOCS)) and info["documents"] == sum(1 for d in DOCS if d)
    assert info["shards"] == len(os.listdir(m.dir)) // 2 and f"{n_train:,}" in out


def bad(argv, capsys, *, match: str, out_dir: str | None = None):
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err
    if out_dir is not None:
        assert not os.path.exists(out_dir), os.listdir(out_dir)


def test_bad_inputs_are_one_line_exit_2_nothing_written(inputs, tmp_path, capsys):
    out = str(tmp_path / "out")
    prep = ["prepare", "--out", out, "--no-progress", "--input"]
    bad(prep + [str(tmp_path / "nope")], capsys, match="does not exist", out_dir=out)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    bad(prep + [str(tmp_path / "junk.parquet")], capsys, match="not a readable Parquet file", out_dir=out)
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    bad(prep + [str(tmp_path / "junk.npy")], capsys, match="not a readable .npy", out_dir=out)
    bad(prep + [inputs["parquet"], "--text-field", "body"], capsys, match="no column 'body'", out_dir=out)
    bad(prep + [inputs["datasets"], "--text-field", "id"], capsys, match="column 'id' is int64, not text",
        out_dir=out)
    (tmp_path / "ok.jsonl").write_text('{"text": "fine"}\n' * 3 + '{"body": "no text field"}\n')
    bad(prep + [inputs["text"], str(tmp_path / "ok.jsonl")], capsys, match="no field 'text'", out_dir=out)


def test_bad_datasets_are_one_line_exit_2(inputs, tmp_path, capsys):
    m = prepare([inputs["text"]], str(tmp_path / "o"), "bytes", shard_tokens=400, progress=False)
    shard = os.path.join(m.dir, m.shards[1]["file"])
    data = open(shard, "rb").read()
    with open(shard, "r+b") as f:   # same size, one byte changed
        f.write(bytes([data[0] ^ 1]))
    assert run_cli(["inspect", m.dir], capsys)[0] == 0   # sizes only
    bad(["inspect", m.dir, "--verify"], capsys, match=f"shard {shard} has sha256")
    with open(shard, "r+b") as f:
        f.truncate(len(data) - 2)
    bad(["inspect", m.dir], capsys, match=f"shard {shard} has {len(data) - 2} bytes, the manifest says {len(data)}")
    stream = S.open_split(m.dir, m, "train")
    stream.read(0, 10)  # shard 0 is fine; the truncated one is named when a read reaches it
    with pytest.raises(UserError, match="has .* bytes, the manifest says"):
        stream.read(0, len(stream))
    os.remove(shard)
    bad(["inspect", m.dir], capsys, match=f"shard {shard} is missing")
    mpath = os.path.join(m.dir, S.MANIFEST)
    obj = json.loads(open(mpath).read())
    obj["version"] = S.VERSION + 1
    open(mpath, "w").write(json.dumps(obj))
    bad(["inspect", m.dir], capsys, match=f"format version {S.VERSION + 1}, newer than")
    bad(["prepare", "--input", inputs["text"], "--out", m.dir, "--no-progress"], capsys,
        match=f"format version {S.VERSION + 1}, newer than")
    bad(["inspect", str(tmp_path)], capsys, match="is not a prepared dataset")


# ---- kill -9 and resume --------------------------------------------------------------------------
def _slow_prepare(argv: list[str], delay: float) -> int:
    """Helper-process entry: the CLI with every finished shard followed by a pause (so a kill lands mid-run)."""
    from parscale_jax.data import prepare as P

    finish = P.ShardWriter._finish

    def slow_finish(self):
        finish(self)
        time.sleep(delay)

    P.ShardWriter._finish = slow_finish
    return main(argv)


@pytest.mark.slow
def test_kill_9_mid_run_and_rerun_gives_identical_output(inputs, tmp_path):
    ids = tmp_path / "ids.npy"   # first: the kills land while it is copied (shards of 97 of its 3000 ids)
    np.save(ids, np.random.default_rng(1).integers(0, 259, size=3000).astype(np.uint16))
    srcs = [str(ids), inputs["text"], inputs["jsonl"], inputs["parquet"]]
    argv = ["prepare", "--input", *srcs, "--shard-tokens", "97", "--heldout-fraction", "0.3", "--no-progress",
            "--tokenizer", "bytes", "--workers", "1"]
    ref = prepare(srcs, str(tmp_path / "ref"), "bytes", shard_tokens=97, heldout_fraction=0.3, progress=False)
    out = str(tmp_path / "out")
    env = dict(os.environ, PYTHONPATH=REPO)
    kept = None
    for kill_after in (12, 45):   # killed twice, at different points; the third run finishes
        proc = subprocess.Popen([sys.executable, __file__, "0.05", *argv, "--out", out], env=env, cwd=REPO)
        state = os.path.join(out, ".prepare")
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if os.path.isdir(state) and len([n for n in os.listdir(state) if n != "job.json"]) >= kill_after:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it was killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not os.path.exists(os.path.join(out, S.MANIFEST))
        if kept is None:
            kept = os.stat(os.path.join(out, "train-00000.bin")).st_ino
    rc = subprocess.run([sys.executable, __file__, "0", *argv, "--out", out], env=env, cwd=REPO).returncode
    assert rc == 0
    assert files_of(out) == files_of(ref.dir)
    assert os.stat(os.path.join(out, "train-00000.bin")).st_ino == kept   # resumed: the first shard was kept


if __name__ == "__main__":
    sys.exit(_slow_prepare(sys.argv[2:], float(sys.argv[1])))
