"""The one loader (every checkpoint kind, the P rule, the tokenizer rule), multi-P editing and the
atomic writes, against what the test itself wrote: random params from the model's abstract
shapes (NumPy, no compilation), compared bitwise."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from parscale_jax import checkpoint, fileio, hf, loading, recycle
from parscale_jax import model as M
from parscale_jax.config import preset
from parscale_jax.errors import UserError
from parscale_jax.params import available_P, trees_equal

CFG = preset("tiny", parscale_n=4, max_position_embeddings=64, parscale_n_tokens=4)


def random_params(cfg, seed):
    rng = np.random.default_rng(seed)
    shapes = M.abstract_params(M.make_model(cfg))
    return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """One checkpoint of every kind, with the params each must give."""
    root = tmp_path_factory.mktemp("kinds")
    p4, p2 = random_params(CFG, 0), random_params(CFG.replace(parscale_n=2), 1)
    p2 = {**p2, "backbone": p4["backbone"]}
    out = {"P4": p4, "P2": p2}
    checkpoint.save_params(str(root / "model"), CFG, p4, extra={"tokenizer": "tok/tokenizer.json"})
    multi = recycle.add_set(recycle.to_multi(p4, include_p1=True), p2)
    checkpoint.save_params(str(root / "multi"), CFG.replace(parscale_n=2), multi)  # saved by the P=2 run
    checkpoint.save_params(str(root / "multi8"), CFG.replace(parscale_n=8), multi)  # its own P is absent
    hf.save_hf(str(root / "hf"), CFG, p4)
    ck = checkpoint.Checkpointer(str(root / "run"), keep=3, async_save=False)
    for step in (1, 2):
        state = {"step": np.int32(step), "params": {k: v for k, v in p4.items() if k != "backbone"},
                 "frozen": {"backbone": p4["backbone"]}, "opt_state": {}, "rng": np.zeros(2, np.uint32)}
        meta = {"model": CFG.to_dict(), "step": step,
                "config": {"data": {"tokenizer": str(root / "tok"), "seq_len": 10 + step}}}
        ck.save(step, state, {"next_batch": step}, meta)
    ck.close()
    return root, out


def test_every_kind_is_read_with_its_params(kinds):
    root, want = kinds
    for path, kind in (("model", "model"), ("hf", "hf"), ("run", "workdir"), ("run/checkpoints/1", "step"),
                       ("multi", "model")):
        got = loading.read(str(root / path))
        assert got.kind == kind == loading.kind_of(str(root / path))
        cfg, params = got.at(4)
        assert cfg == CFG and trees_equal(params, want["P4"]), path
    assert loading.read(str(root / "run")).meta["step"] == 2  # the newest complete step
    cfg, params = loading.load(str(root / "multi"), 2)
    assert cfg == CFG.replace(parscale_n=2) and trees_equal(params, want["P2"])


def test_the_P_rule(kinds):
    root, want = kinds
    assert loading.load(str(root / "model"))[0].parscale_n == 4           # its own P
    assert loading.load(str(root / "multi"))[0].parscale_n == 2           # the P it was saved with
    assert loading.load(str(root / "multi8"))[0].parscale_n == 4          # own P absent: the largest held
    assert available_P(loading.read(str(root / "multi")).params) == [1, 2, 4]
    cfg1, p1 = loading.load(str(root / "multi"), 1)
    assert cfg1.prefix_len == 0 and sorted(p1) == ["backbone"] and trees_equal(p1["backbone"], want["P4"]["backbone"])
    for path, P, avail in (("multi", 3, "[1, 2, 4]"), ("model", 2, "[4]")):
        with pytest.raises(UserError, match=rf"P={P} is not in this checkpoint: available P = \{avail}"):
            loading.load(str(root / path), P)


def test_bad_paths_are_one_line_errors(kinds, tmp_path):
    root, _ = kinds
    (tmp_path / "empty").mkdir()
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    os.makedirs(tmp_path / "fresh" / "checkpoints")
    cut = tmp_path / "cut"
    os.makedirs(cut / "meta")
    (cut / "meta" / "metadata").write_text("{}")  # a step without orbax's commit marker
    cases = {"nowhere": "does not exist", "empty": "no checkpoint at", "llama": "model_type 'llama'",
             "fresh": "no complete checkpoint", "cut": "cut off"}
    for name, words in cases.items():
        with pytest.raises(UserError, match=words):
            loading.read(str(tmp_path / name))


def test_run_config_and_the_tokenizer_rule(kinds, tmp_path):
    root, _ = kinds
    assert loading.run_config(str(root / "run"))["data"]["seq_len"] == 12
    assert loading.run_config(str(root / "run/checkpoints/1"))["data"]["seq_len"] == 11
    assert loading.run_config(str(root / "model")) is None
    tok_dir = root / "tok"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "tokenizer.json").write_text("{}")
    # named by the training run (a folder), named by model_config.json (relative to the checkpoint)
    assert loading.tokenizer_of(str(root / "run")) == str(tok_dir / "tokenizer.json")
    (root / "model" / "tok").mkdir()
    (root / "model" / "tok" / "tokenizer.json").write_text("{}")
    assert loading.tokenizer_of(str(root / "model")) == str(root / "model" / "tok" / "tokenizer.json")
    assert loading.tokenizer_of(str(root / "hf")) is None  # nothing named: the byte tokenizer
    (root / "hf" / "tokenizer.json").write_text("{}")
    assert loading.tokenizer_of(str(root / "hf")) == str(root / "hf" / "tokenizer.json")  # beside it wins


def test_add_set_to_builds_and_extends_a_multi_P_checkpoint(kinds, tmp_path):
    root, want = kinds
    path = str(tmp_path / "multi")
    recycle.add_set_to(path, CFG.replace(parscale_n=2), want["P2"])
    assert available_P(loading.read(path).params) == [1, 2]
    recycle.add_set_to(path, CFG, want["P4"])
    got = loading.read(path)
    assert got.available_P == [1, 2, 4] and trees_equal(got.at(4)[1], want["P4"])
    assert [n for n in os.listdir(tmp_path) if n != "multi"] == []  # no temporary left behind
    other = {**want["P4"], "backbone": jax.tree.map(lambda a: a + 1, want["P4"]["backbone"])}
    with pytest.raises(UserError, match="backbone"):
        recycle.add_set_to(path, CFG, other)
    with pytest.raises(UserError, match="workdir checkpoint"):
        recycle.add_set_to(str(root / "run"), CFG, want["P4"])
    assert loading.read(path).available_P == [1, 2, 4]


def test_atomic_writes_leave_the_old_or_the_new(tmp_path):
    f = tmp_path / "r.json"
    fileio.write_json(str(f), {"a": 1})
    with pytest.raises(RuntimeError):
        with fileio.atomic_file(str(f)) as fh:
            fh.write('{"a": 2')
            raise RuntimeError("killed mid-write")
    assert json.loads(f.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["r.json"]
    d = tmp_path / "d"
    with fileio.atomic_dir(str(d)) as tmp:
        with open(os.path.join(tmp, "x"), "w") as fh:
            fh.write("old")
    with pytest.raises(UserError, match="already exists"):
        with fileio.atomic_dir(str(d)):
            pass
    with pytest.raises(RuntimeError):
        with fileio.atomic_dir(str(d), replace=True) as tmp:
            with open(os.path.join(tmp, "x"), "w") as fh:
                fh.write("half")
            raise RuntimeError("failed")
    assert open(d / "x").read() == "old"
    with fileio.atomic_dir(str(d), replace=True) as tmp:
        with open(os.path.join(tmp, "x"), "w") as fh:
            fh.write("new")
    assert open(d / "x").read() == "new" and sorted(os.listdir(tmp_path)) == ["d", "r.json"]
