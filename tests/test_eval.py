"""Evaluation (held-out loss, choice scoring, checkpoint loading at a chosen P), the eval.py command
line and the nextline task builder, against independent computations: one unpadded forward per
window / per (context, choice) with a float64 NumPy log-softmax, token streams built by hand from
the text, and the source files the task records point at."""
from __future__ import annotations

import collections
import functools
import json
import math

import jax
import numpy as np
import pytest

from parscale_jax import checkpoint, data, hf, loading, recycle, tasks
from parscale_jax import evaluate as E
from parscale_jax import model as M
from parscale_jax.cli import eval as cli
from parscale_jax.config import preset
from parscale_jax.errors import UserError
from parscale_jax.params import trees_equal

EOS = 258
POSITIONS = 64


def _perturbed(params, P):
    """Bigger embeddings / prefixes / gate than at init, so outputs are far from uniform."""
    params = dict(params)
    params["backbone"] = jax.tree.map(lambda a: a, params["backbone"])
    params["backbone"]["embed"]["embedding"] = params["backbone"]["embed"]["embedding"] * 20.0
    params["backbone"]["lm_head"]["kernel"] = params["backbone"]["lm_head"]["kernel"] * 20.0
    if P > 1:
        params["prefix"] = jax.tree.map(lambda a: a * 30.0, params["prefix"])
        params["aggregator"] = jax.tree.map(lambda a: a * 25.0, params["aggregator"])
    return params


@pytest.fixture(scope="module")
def models():
    """P=4 and P=1 (its bare backbone) models, and a multi-P checkpoint holding both."""
    cfg4 = preset("tiny", parscale_n=4, max_position_embeddings=POSITIONS, tie_word_embeddings=False)
    m4 = M.make_model(cfg4)
    p4 = _perturbed(jax.jit(functools.partial(M.init_params, m4))(jax.random.PRNGKey(4)), 4)
    cfg1 = cfg4.replace(parscale_n=1)
    m1 = M.make_model(cfg1)
    p1 = {"backbone": p4["backbone"]}
    return {4: (cfg4, m4, p4), 1: (cfg1, m1, p1)}


@pytest.fixture(scope="module")
def ckpt(models, tmp_path_factory):
    cfg4, _, p4 = models[4]
    path = str(tmp_path_factory.mktemp("ckpt") / "multi")
    checkpoint.save_params(path, cfg4, recycle.to_multi(p4, include_p1=True))
    return path


# ---- independent references ------------------------------------------------------------------
def _log_softmax64(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, tokens, mask):
    return model.apply({"params": params}, tokens, attention_mask=mask)[0]


def _forward(model, params, seq):
    """One sequence alone, float64 log-probs [len(seq), V]. It is left-padded to the model's
    positions with an attention mask (left padding = no padding, checked in test_model), so one
    compilation serves every length; the code under test right-pads and batches instead."""
    n = len(seq)
    tokens = np.zeros((1, POSITIONS), np.int32)
    mask = np.zeros((1, POSITIONS), bool)
    tokens[0, POSITIONS - n:], mask[0, POSITIONS - n:] = seq, True
    return _log_softmax64(_apply(model, params, tokens, mask)[0, POSITIONS - n:])


def ref_window_nll(model, params, tokens, L, max_windows=None):
    """(summed NLL, targets, windows) by a loop over the consecutive windows of L tokens."""
    n = len(tokens) // L
    if max_windows is not None:
        n = min(n, max_windows)
    total = 0.0
    for i in range(n):
        w = np.asarray(tokens[i * L:(i + 1) * L])
        lp = _forward(model, params, w[:-1])
        total -= lp[np.arange(L - 1), w[1:]].sum()
    return total, n * (L - 1), n


# ---- held-out loss -----------------------------------------------------------------------------
@pytest.mark.slow
def test_window_loss_matches_loop_over_windows(models):
    cfg, model, params = models[4]
    rng = np.random.default_rng(0)
    L = 17
    tokens = rng.integers(0, 259, size=3 * L + 7).astype(np.int32)  # 3 windows + a dropped remainder
    tokens[::11] = EOS
    total, n_t, n_w = ref_window_nll(model, params, tokens, L)
    res = E.window_loss(model, params, tokens, L, batch_size=2)  # the 2nd batch is padded
    assert (res["tokens"], res["windows"]) == (n_t, n_w) == (3 * (L - 1), 3)
    np.testing.assert_allclose(res["loss"], total / n_t, rtol=1e-5)
    np.testing.assert_allclose(res["perplexity"], math.exp(total / n_t), rtol=1e-5)
    assert res["loss"] > 1.0  # far from a trivial value

    # the report both eval.py and the training loop use: + bits per byte over the scored bytes
    total2, n_t2, _ = ref_window_nll(model, params, tokens, L, max_windows=2)
    rep = E.heldout_loss(model, params, tokens, L, batch_size=2, max_windows=2, tokenizer=data.ByteTokenizer())
    n_bytes = int(sum(np.sum(tokens[i * L + 1:(i + 1) * L] < 256) for i in range(2)))
    assert rep["tokens"] == n_t2 and rep["bytes"] == n_bytes
    np.testing.assert_allclose(rep["loss"], total2 / n_t2, rtol=1e-5)
    np.testing.assert_allclose(rep["bits_per_byte"], total2 / (math.log(2) * n_bytes), rtol=1e-5)
    assert E.heldout_loss(model, params, tokens, L, 2)["bits_per_byte"] is None  # no tokenizer


@pytest.mark.slow
def test_window_loss_compiles_once_per_model_and_shape(models):
    """The training loop calls it at every eval: new params of the same shapes must not recompile."""
    cfg, model, params = models[1]
    tokens = np.arange(200, dtype=np.int32) % 250
    E.window_loss(model, params, tokens, 20, 4)
    n = E._windows_nll._cache_size()
    other = jax.tree.map(lambda a: a * 1.01, params)
    a = E.window_loss(model, other, tokens, 20, 4)["loss"]
    b = E.window_loss(M.make_model(cfg), other, tokens, 20, 4)["loss"]  # an equal model: same entry
    assert E._windows_nll._cache_size() == n
    assert a == b


# ---- choice scoring ----------------------------------------------------------------------------
RECORDS = [
    {"context": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "answer": 0},
    {"context": "x = 1 ", "choices": ["+ 2", "* 3 * 4"], "answer": 1},  # trailing space moves to the choice
    {"context": "import os\n" * 9, "choices": ["import sys", "print(1)"], "answer": 0},  # longer than 64 positions
    {"context": "", "choices": ["hello", "hi"], "answer": 1},  # empty context: scored after EOS
]


def ref_choice_logliks(model, params, records, max_len):
    out = []
    for r in records:
        ctx = r["context"]
        n_sp = len(ctx) - len(ctx.rstrip(" "))
        for c in r["choices"]:
            cont = list((" " * n_sp + c).encode())
            head = [EOS] if not ctx.rstrip(" ") else list(ctx.rstrip(" ").encode())
            seq = (head + cont)[-(max_len + 1):]
            n = min(len(cont), len(seq) - 1)
            lp = _forward(model, params, seq[:-1])
            out.append(sum(lp[t, seq[t + 1]] for t in range(len(seq) - 1 - n, len(seq) - 1)))
    return np.array(out)


@pytest.mark.slow
def test_choice_scoring_matches_loop_of_full_forwards(models):
    cfg, model, params = models[4]
    ref = ref_choice_logliks(model, params, RECORDS, POSITIONS)
    res = E.choice_accuracy(model, params, RECORDS, data.ByteTokenizer(), batch_size=3)  # 9 seqs, 3 batches
    np.testing.assert_allclose(res["loglik"], ref, rtol=1e-5, atol=1e-4)
    acc, acc_norm, i = [], [], 0
    for r in RECORDS:
        s = ref[i:i + len(r["choices"])]
        i += len(r["choices"])
        acc.append(np.argmax(s) == r["answer"])
        acc_norm.append(np.argmax(s / [len(c) for c in r["choices"]]) == r["answer"])
    assert res["n"] == len(RECORDS)
    assert res["acc"] == pytest.approx(np.mean(acc)) and res["acc_norm"] == pytest.approx(np.mean(acc_norm))
    np.testing.assert_allclose(res["acc_stderr"], np.std(acc, ddof=1) / 2.0, rtol=1e-9)


@pytest.mark.parametrize("lines,lineno,what", [
    (['{"context": "a", "choices": ["b", "c"], "answer": 0}', '{"context": "a", "choices": ["b"'], 2, "JSON"),
    (['{"context": "a", "choices": ["b", "c"], "answer": 0}', "", '{"context": "a", "choices": ["b", "c"]}'],
     3, "answer"),
    (['{"context": "a", "choices": ["b", "c"], "answer": 2}'], 1, "answer"),
    (['{"context": "a", "choices": "bc", "answer": 0}'], 1, "choices"),
    (['["a", "b"]'], 1, "object"),
    (['{"context": 5, "choices": ["b", "c"], "answer": 0}'], 1, "context"),
])
def test_malformed_task_records_name_the_line(tmp_path, lines, lineno, what):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as e:
        E.load_tasks(str(path))
    assert f"{path}:{lineno}:" in str(e.value) and what in str(e.value)


# ---- checkpoints at a chosen P -----------------------------------------------------------------
@pytest.mark.slow
def test_load_checkpoint_selects_P(models, ckpt):
    cfg, params = loading.load(ckpt)  # default: the config's P
    assert cfg.parscale_n == 4 and trees_equal(params, models[4][2])
    cfg1, params1 = loading.load(ckpt, 1)
    assert cfg1.parscale_n == 1 and cfg1.prefix_len == 0 and sorted(params1) == ["backbone"]
    assert trees_equal(params1["backbone"], models[4][2]["backbone"])
    with pytest.raises(UserError, match=r"available P = \[1, 4\]"):
        loading.load(ckpt, 2)


# ---- the command line (in-process) -------------------------------------------------------------
def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, err, *words):
    assert rc == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w in lines[-1], lines[-1]


TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n\n" for i in range(80))


@pytest.mark.slow
def test_cli_loss_on_all_data_matches_reference(models, ckpt, tmp_path, capsys):
    src = tmp_path / "code.txt"
    src.write_text(TEXT)
    tokens = np.array(list(TEXT.encode()) + [EOS], np.int32)  # one document, then EOS
    L, out = 33, tmp_path / "r.json"
    for P in (4, 1):
        rc, stdout, err = _run(capsys, "--checkpoint", ckpt, "--data", str(src), "--split", "all",
                               "--seq-len", str(L), "--batch-size", "8", "--max-windows", "20",
                               "--P", str(P), "--output", str(out))
        assert rc == 0, err
        res = json.loads(out.read_text())
        _, model, params = models[P]
        total, n_t, n_w = ref_window_nll(model, params, tokens, L, max_windows=20)
        n_bytes = int(sum(np.sum(tokens[i * L + 1:(i + 1) * L] < 256) for i in range(n_w)))
        assert res["P"] == P and res["tokens"] == n_t == 20 * (L - 1)
        np.testing.assert_allclose(res["loss"], total / n_t, rtol=1e-5)
        np.testing.assert_allclose(res["perplexity"], math.exp(total / n_t), rtol=1e-5)
        np.testing.assert_allclose(res["bits_per_byte"], total / (math.log(2) * n_bytes), rtol=1e-5)
        assert f"{res['loss']:.4f}" in stdout and "bits per byte" in stdout


@pytest.mark.slow
def test_cli_loss_explicit_data_is_scored_whole_unless_heldout_is_asked(models, ckpt, tmp_path, capsys):
    """An explicit --data: every token by default; with --split heldout, the pipeline's held-out part
    of one file (its last ceil(5%) of tokens), exactly those."""
    src = tmp_path / "code.txt"
    src.write_text(TEXT)
    tokens = np.array(list(TEXT.encode()) + [EOS], np.int32)
    held = tokens[len(tokens) - math.ceil(0.05 * len(tokens)):]
    L, out = 33, tmp_path / "r.json"
    _, model, params = models[4]
    for split, want in ((None, tokens), ("heldout", held)):
        rc, _, err = _run(capsys, "--checkpoint", ckpt, "--data", str(src), "--seq-len", str(L), "--batch-size", "8",
                          "--output", str(out), *(["--split", split] if split else []))
        assert rc == 0, err
        res = json.loads(out.read_text())
        total, n_t, _ = ref_window_nll(model, params, want, L)
        assert res["tokens"] == n_t > 0 and res["split"] == (split or "all")
        np.testing.assert_allclose(res["loss"], total / n_t, rtol=1e-5)


@pytest.mark.slow
def test_cli_npy_ids_checked_against_the_model_vocabulary(models, ckpt, tmp_path, capsys):
    """Ids of a model whose vocabulary (384) is larger than the byte tokenizer's (259) are scored
    without a tokenizer; bits per byte only once one is named; an id outside the model is one line."""
    ids = np.random.default_rng(0).integers(0, 384, size=400).astype(np.int32)
    assert ids.max() >= 259
    np.save(tmp_path / "ids.npy", ids)
    L, out = 33, tmp_path / "r.json"
    _, model, params = models[4]
    total, n_t, _ = ref_window_nll(model, params, np.concatenate([ids, [EOS]]).astype(np.int32), L)
    for tok in (None, "bytes"):
        rc, stdout, err = _run(capsys, "--checkpoint", ckpt, "--data", str(tmp_path / "ids.npy"), "--seq-len", str(L),
                               "--output", str(out), *(["--tokenizer", tok] if tok else []))
        assert rc == 0, err
        res = json.loads(out.read_text())
        assert res["tokens"] == n_t and res["split"] == "all"
        np.testing.assert_allclose(res["loss"], total / n_t, rtol=1e-5)
        assert (res["bits_per_byte"] is None) == (tok is None), res
        assert ("tokenizer unknown" in stdout) == (tok is None), stdout
    np.save(tmp_path / "bad.npy", np.asarray([1, 2, 384], np.int32))
    rc, _, err = _run(capsys, "--checkpoint", ckpt, "--data", str(tmp_path / "bad.npy"), "--seq-len", "2")
    assert rc == 2 and "token id 384 is outside the model's vocabulary [0, 384)" in err, err


@pytest.mark.slow
def test_cli_data_flags_default_to_the_training_runs(models, ckpt, tmp_path, capsys, monkeypatch):
    """For a training checkpoint the run's data section (source, split fraction, window length)
    fills the flags not given; a flag given wins."""
    src = tmp_path / "code.txt"
    src.write_text(TEXT)
    tokens = np.array(list(TEXT.encode()) + [EOS], np.int32)
    run = {"source": str(src), "format": "text", "heldout_fraction": 0.2, "seq_len": 40, "tokenizer": "bytes"}
    monkeypatch.setattr(cli, "run_data", lambda args: run)
    out = tmp_path / "r.json"
    _, model, params = models[4]
    for extra, L in (([], 40), (["--seq-len", "25"], 25)):
        rc, _, err = _run(capsys, "--checkpoint", ckpt, "--output", str(out), *extra)
        assert rc == 0, err
        res = json.loads(out.read_text())
        held = tokens[len(tokens) - math.ceil(0.2 * len(tokens)):]
        total, n_t, _ = ref_window_nll(model, params, held, L)
        assert res["seq_len"] == L and res["data"] == str(src) and res["tokens"] == n_t
        np.testing.assert_allclose(res["loss"], total / n_t, rtol=1e-5)


def test_run_config_reads_the_newest_steps_meta(tmp_path):
    for step, seq in ((3, 11), (12, 22)):  # layout of checkpoint.Checkpointer: checkpoints/<step>/meta/metadata
        d = tmp_path / "run" / "checkpoints" / str(step) / "meta"
        d.mkdir(parents=True)
        (d / "metadata").write_text(json.dumps({"model": {}, "step": step, "config": {"data": {"seq_len": seq}}}))
        (d.parent / "commit_success.txt").write_text("")  # orbax's commit marker
    (tmp_path / "run" / "checkpoints" / "20.orbax-checkpoint-tmp-1").mkdir()  # uncommitted: ignored
    assert loading.run_config(str(tmp_path / "run")) == {"data": {"seq_len": 22}}
    assert loading.run_config(str(tmp_path / "run" / "checkpoints" / "3")) == {"data": {"seq_len": 11}}
    assert loading.run_config(str(tmp_path)) is None


@pytest.mark.slow
def test_cli_tasks(models, ckpt, tmp_path, capsys):
    path, out = tmp_path / "mini.jsonl", tmp_path / "r.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    rc, stdout, err = _run(capsys, "--checkpoint", ckpt, "--tasks", str(path), "--batch-size", "4",
                           "--output", str(out))
    assert rc == 0, err
    res = json.loads(out.read_text())
    ref = ref_choice_logliks(models[4][1], models[4][2], RECORDS, POSITIONS)
    want, i = [], 0
    for r in RECORDS:
        want.append(np.argmax(ref[i:i + len(r["choices"])]) == r["answer"])
        i += len(r["choices"])
    assert res["tasks"]["mini"]["acc"] == pytest.approx(np.mean(want)) and res["tasks"]["mini"]["n"] == 4
    assert "loss" not in res and "mini acc" in stdout  # --tasks alone: no loss pass


@pytest.mark.slow
def test_cli_errors_are_one_line(ckpt, tmp_path, capsys):
    rc, _, err = _run(capsys, "--checkpoint", str(tmp_path / "nope"))
    _one_line_error(rc, err, "does not exist", "nope")
    rc, _, err = _run(capsys, "--checkpoint", ckpt, "--P", "2", "--data", "x")
    _one_line_error(rc, err, "P=2", "available P = [1, 4]")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    rc, _, err = _run(capsys, "--checkpoint", ckpt, "--data", str(empty_dir), "--seq-len", "33")
    _one_line_error(rc, err, str(empty_dir))
    (tmp_path / "tiny.txt").write_text("ab")
    rc, _, err = _run(capsys, "--checkpoint", ckpt, "--data", str(tmp_path / "tiny.txt"), "--split", "all",
                      "--seq-len", "33")
    _one_line_error(rc, err, "tokens", "--seq-len")
    rc, _, err = _run(capsys, "--checkpoint", ckpt, "--seq-len", str(POSITIONS + 2))
    _one_line_error(rc, err, "positions")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b", "c"], "answer": 1}\n{"context": "a"}\n')
    rc, _, err = _run(capsys, "--checkpoint", ckpt, "--tasks", str(bad), "--seq-len", "33")
    _one_line_error(rc, err, f"{bad}:2:")
    rc, _, err = _run(capsys, "generate", "--checkpoint", ckpt, "--prompt", "x" * (POSITIONS + 1))
    _one_line_error(rc, err, "positions", str(POSITIONS))


@pytest.mark.slow
def test_cli_hugging_face_directory(models, tmp_path, capsys):
    """A qwen2_parscale directory (hf.save_hf) scores the same as the params it was written from."""
    cfg, model, params = models[4]
    hf_dir = str(tmp_path / "hf")
    hf.save_hf(hf_dir, cfg, params)
    src = tmp_path / "code.txt"
    src.write_text(TEXT)
    out = tmp_path / "r.json"
    rc, _, err = _run(capsys, "--checkpoint", hf_dir, "--data", str(src), "--split", "all", "--seq-len", "33",
                      "--max-windows", "4", "--output", str(out))
    assert rc == 0, err
    tokens = np.array(list(TEXT.encode()) + [EOS], np.int32)
    total, n_t, _ = ref_window_nll(model, params, tokens, 33, max_windows=4)
    res = json.loads(out.read_text())
    assert res["P"] == 4
    np.testing.assert_allclose(res["loss"], total / n_t, rtol=1e-5)


# ---- the nextline task -------------------------------------------------------------------------
def _check_nextline(records, files: dict[str, str]):
    """Every record against its source file: context = the whole lines just before the true line."""
    lines_of = {rel: open(p, encoding="utf-8", errors="replace").read().splitlines(keepends=True)
                for rel, p in files.items()}
    found_in = collections.defaultdict(set)  # stripped line -> files holding it
    for rel, lines in lines_of.items():
        for ln in lines:
            found_in[ln.strip()].add(rel)
    for r in records:
        rel, line = r["doc"].rsplit(":", 1)
        lines, i = lines_of[rel], int(line) - 1
        true = r["choices"][r["answer"]]
        assert true == lines[i].rstrip()
        assert r["context"].endswith("\n") and "".join(lines[:i]).endswith(r["context"])
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        indent = true[: len(true) - len(true.lstrip())]
        for j, c in enumerate(r["choices"]):
            assert c.startswith(indent) and not c[len(indent)].isspace()
            if j != r["answer"]:
                assert found_in[c.strip()] - {rel}  # a line of another file


def test_nextline_builder_on_synthetic_files(tmp_path):
    files = {}
    for k in range(5):
        p = tmp_path / f"mod{k}.py"
        p.write_text("".join(f"def func_{k}_{i}(value_{i}):\n    result_{k} = value_{i} * {i + k}\n"
                             f"    return result_{k} + {k * 100 + i}\n\n" for i in range(30)))
        files[p.name] = str(p)
    a = tasks.build_nextline(files.items(), n=30, seed=0)
    assert a == tasks.build_nextline(files.items(), n=30, seed=0)  # deterministic
    assert a != tasks.build_nextline(files.items(), n=30, seed=1)
    assert len(a) == 30 and len({r["answer"] for r in a}) == 4
    _check_nextline(a, files)
    with pytest.raises(UserError, match="lower --n"):
        tasks.build_nextline(files.items(), n=10_000, seed=0)


def test_nextline_builder_cli_on_the_heldout_corpus(tmp_path, capsys):
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for out in outs:
        assert tasks.main(["build", "--out", str(out), "--n", "40"]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()  # deterministic
    records = [json.loads(ln) for ln in outs[0].read_text().splitlines()]
    assert len(records) == 40 and len(E.load_tasks(str(outs[0]))) == 40
    split = data.split_units(data.DataConfig())
    held = {u.key: u.file.path for u in split.heldout}
    train = {u.key for u in split.train}
    docs = {r["doc"].rsplit(":", 1)[0] for r in records}
    assert docs <= set(held) and not docs & train  # only held-out files
    _check_nextline(records, held)
