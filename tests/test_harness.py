"""The lm-evaluation-harness adapter (``parscale_jax.harness``, ``eval.py harness``), offline, on tasks
written here: multiple choice (the task directory the project's task builder writes), a rolling
bits-per-byte task (``dataset_path: json``) and a generation task with a stop string, at P = 1, 2, 4.

Every number is checked against an independent computation: one unpadded, unbatched forward per
scored sequence (left-padded to the model's positions with an attention mask, the full logits,
a float64 NumPy log-softmax), lm-eval's encoding rules written out on the bytes, greedy decoding
by repeated full forwards without a cache, and eval.py's held-out bits per byte.
"""
from __future__ import annotations

import functools
import json
import math
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from parscale_jax import checkpoint, data, harness, tasks  # noqa: E402
from parscale_jax import model as M  # noqa: E402
from parscale_jax.cli import eval as cli  # noqa: E402
from parscale_jax.config import preset  # noqa: E402

EOS = 258
POS = 48          # the model's positions = the harness's max_length
SMALLEST = 16     # length buckets 16, 32, 48
BATCH = 4
MAX_GEN = 10


def _random_params(model, seed):
    """NumPy params of the model's shapes (no init program to compile): norms 1, embeddings, prefixes
    and the gate large enough that the outputs are far from uniform (clear argmaxes)."""
    rng = np.random.default_rng(seed)

    def one(path, a):
        keys = [str(getattr(k, "key", k)) for k in path]
        std = 0.4 if "embed" in keys else 0.6 if "prefix" in keys else 0.5 if "aggregator" in keys else 0.1
        return np.ones(a.shape, np.float32) if "scale" in keys else rng.normal(0, std, a.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, M.abstract_params(model))


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No network: the datasets library in offline mode (also when it was imported before this module)."""
    import datasets

    mp = pytest.MonkeyPatch()
    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def models():
    out = {}
    for P in (1, 2, 4):
        cfg = preset("tiny", parscale_n=P, max_position_embeddings=POS, num_hidden_layers=1)
        m = M.make_model(cfg)
        out[P] = (cfg, m, _random_params(m, P))
    return out


@pytest.fixture(scope="module")
def lms(models):
    """The adapters; P = 2 pads into three length buckets (16, 32, 48), the others into one (48):
    fewer compilations."""
    return {P: harness.JaxLM.from_model(m, p, data.ByteTokenizer(), batch_size=BATCH,
                                        smallest_bucket=SMALLEST if P == 2 else POS)
            for P, (_, m, p) in models.items()}


# ---- independent references --------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, tokens, mask):
    return model.apply({"params": params}, tokens, attention_mask=mask)[0]


def _logprobs(model, params, seq):
    """float64 log-probs [len(seq), V] of one sequence alone (left-padded to POS, masked)."""
    n = len(seq)
    tokens, mask = np.zeros((1, POS), np.int32), np.zeros((1, POS), bool)
    tokens[0, POS - n:], mask[0, POS - n:] = seq, True
    z = np.asarray(_apply(model, params, tokens, mask)[0, POS - n:], np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def ref_score(model, params, ctx, cont):
    """(log p(cont | ctx), greedy) as lm-eval's HF backend computes it: left truncation to POS + 1."""
    seq = (list(ctx) + list(cont))[-(POS + 1):]
    n = min(len(cont), len(seq) - 1)
    lp = _logprobs(model, params, seq[:-1])
    pos = range(len(seq) - 1 - n, len(seq) - 1)
    return sum(lp[t, seq[t + 1]] for t in pos), all(int(np.argmax(lp[t])) == seq[t + 1] for t in pos)


def ref_pair(context, choice):
    """lm-eval's encoding on bytes: trailing whitespace of the context moves to the continuation;
    an empty context is [EOS] (the adapter's prefix token)."""
    n = len(context) - len(context.rstrip())
    ctx, cont = context[: len(context) - n], context[len(context) - n:] + choice
    return (list(ctx.encode()) or [EOS]), list(cont.encode())


def ref_rolling(model, params, text):
    """Summed log-likelihood of a document over rolling windows of POS tokens (the first after EOS)."""
    t = list(text.encode())
    first = min(POS, len(t))
    total = ref_score(model, params, [EOS], t[:first])[0]
    done = first
    while done < len(t):
        k = min(len(t) - done, POS)
        end = done + k
        total += ref_score(model, params, t[end - POS - 1: end - k], t[end - k: end])[0]
        done = end
    return total


def ref_generate(model, params, prompt, stops):
    """Greedy text by repeated full forwards (no cache), cut at the first stop string."""
    seq = list(prompt.encode())[-(POS - MAX_GEN):] or [EOS]  # an empty prompt starts after EOS
    new = []
    for _ in range(MAX_GEN):
        nxt = int(np.argmax(_logprobs(model, params, seq + new)[-1]))
        new.append(nxt)
        if nxt == EOS:
            break
    text = bytes(b for b in new if b < 256).decode("utf-8", errors="replace")
    for s in stops:
        text = text.split(s)[0]
    return text


# ---- the tasks ---------------------------------------------------------------------------------
LONG = "".join(f"line {i} = {i * i}\n" for i in range(12))  # longer than POS bytes: cut from the left
MC = [
    {"context": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "answer": 0},
    {"context": "x = 1 ", "choices": ["+ 2", "* 3 * 4"], "answer": 1},       # trailing space
    {"context": "import os\n", "choices": ["import sys", "print(1)"], "answer": 0},  # trailing newline
    {"context": "", "choices": ["hello", "hi"], "answer": 1},                   # empty context
    {"context": LONG, "choices": ["line 12 = 144", "pass"], "answer": 0},       # longer than max_length
    {"context": "for i in range(3):", "choices": ["\n    print(i)", " pass", "\n\tbreak"], "answer": 2},
]
DOCS = ["hello world, hello parscale", "x" * 5, LONG * 2, "def f(x):\n    return x * 2\n"]
PROMPTS = ["def f(", "import ", "x = [1, 2", "class A:\n    ", "# a comment", "", "print('hi')\n"]


def _yaml(folder, name, body: dict) -> None:
    (folder / f"{name}.yaml").write_text(json.dumps({"task": name, **body}, indent=1))  # JSON is YAML


def _json_task(folder, name, rows, **body) -> None:
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _yaml(folder, name, {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / f"{name}.jsonl")}},
                         "test_split": "test", **body})


def _evaluate(lm, folder, names, **kw):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(folder), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tm, log_samples=True, **kw)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("tasks")
    jsonl = root / "choice.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in MC))
    folder = tasks.write_task_dir(str(jsonl))  # the project's builder: tasks/choice/ beside the JSONL
    from pathlib import Path

    folder = Path(folder)
    _json_task(folder, "roll", [{"text": d} for d in DOCS], output_type="loglikelihood_rolling", doc_to_text="",
               doc_to_target="text", metric_list=[{"metric": m} for m in
                                                  ("word_perplexity", "byte_perplexity", "bits_per_byte")])
    # a stop string that greedy decoding of the P=1 model reaches in its first prompt
    cfg, m, p = models[1]
    stop = ref_generate(m, p, PROMPTS[0], [])[2:4] or "\n"
    _json_task(folder, "gen", [{"prompt": q, "target": ""} for q in PROMPTS], output_type="generate_until",
               doc_to_text="prompt", doc_to_target="target", metric_list=[{"metric": "exact_match"}],
               generation_kwargs={"until": [stop, "\n\n"], "max_gen_toks": MAX_GEN, "do_sample": False})
    return folder, [stop, "\n\n"]


@pytest.fixture(scope="module")
def results(lms, task_dir):
    folder, _ = task_dir
    return {P: _evaluate(lm, folder, ["choice", "roll", "gen"]) for P, lm in lms.items()}


# ---- tests ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("P", [1, 2, 4])
def test_multiple_choice_matches_unbatched_forwards(models, results, P):
    _, m, p = models[P]
    samples = results[P]["samples"]["choice"]
    assert len(samples) == len(MC)
    acc, acc_norm = [], []
    for s in samples:
        r = MC[s["doc_id"]]
        got = [resp[0] for resp in s["resps"]]
        ref = [ref_score(m, p, *ref_pair(r["context"], c)) for c in r["choices"]]
        np.testing.assert_allclose([g[0] for g in got], [x[0] for x in ref], rtol=1e-5, atol=2e-4)
        assert [bool(g[1]) for g in got] == [x[1] for x in ref]
        ll = np.array([x[0] for x in ref])
        acc.append(np.argmax(ll) == r["answer"])
        acc_norm.append(np.argmax(ll / [len(c) for c in r["choices"]]) == r["answer"])
    res = results[P]["results"]["choice"]
    assert res["acc,none"] == pytest.approx(np.mean(acc)) and res["acc_norm,none"] == pytest.approx(np.mean(acc_norm))


@pytest.mark.slow
@pytest.mark.parametrize("P", [1, 2, 4])
def test_rolling_bits_per_byte_matches_windows_of_forwards(models, results, P):
    _, m, p = models[P]
    samples = sorted(results[P]["samples"]["roll"], key=lambda s: s["doc_id"])
    ref = [ref_rolling(m, p, d) for d in DOCS]
    np.testing.assert_allclose([s["resps"][0][0] for s in samples], ref, rtol=1e-5, atol=5e-4)
    bpb = -sum(ref) / (math.log(2) * sum(len(d.encode()) for d in DOCS))
    assert results[P]["results"]["roll"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("P", [1, 2, 4])
def test_generation_with_stop_string_matches_greedy_loop(models, results, task_dir, P):
    _, m, p = models[P]
    stops = task_dir[1]
    samples = sorted(results[P]["samples"]["gen"], key=lambda s: s["doc_id"])
    got = [s["resps"][0][0] for s in samples]
    assert got == [ref_generate(m, p, q, stops) for q in PROMPTS]
    if P == 1:  # the stop string was cut from the first text (found in it, shorter than MAX_GEN bytes)
        assert len(got[0].encode()) < MAX_GEN


@pytest.mark.slow
def test_alone_vs_padded_batch_and_compiles_per_bucket(models, lms, results):
    """Once the tasks have run at P=2: a request scored alone equals it inside a padded batch of
    longer ones (another length bucket) within 1e-5, and the jitted forward compiled at most once
    per bucket (every bucket used)."""
    lm = lms[2]
    req = (None, [EOS] + list(b"short context"), list(b" and its continuation"))
    others = [(None, list(LONG.encode()), list(b"tail")), (None, list(b"mid-length context here"), list(b" x" * 8))]
    alone = lm._loglikelihood_tokens([req], disable_tqdm=True)[0]
    batched = lm._loglikelihood_tokens(others + [req] + others, disable_tqdm=True)[2]
    assert abs(alone[0] - batched[0]) <= 1e-5 and alone[1] == batched[1]
    assert lm.buckets == (16, 32, 48)
    assert lm._score._cache_size() <= len(lm.buckets)
    assert lm._score._cache_size() == len(lm.buckets)  # the tasks reached every bucket


@pytest.fixture(scope="module")
def ckpt2(models, tmp_path_factory):
    cfg, _, p = models[2]
    path = str(tmp_path_factory.mktemp("ckpt") / "p2")
    checkpoint.save_params(path, cfg, p)
    return path


@pytest.mark.slow
def test_eval_py_harness_command(ckpt2, task_dir, results, tmp_path, capsys):
    """README's command on a saved checkpoint: the same accuracies as the adapter built in hand, the
    table on stdout, the JSON written; unknown tasks and bad flags are one-line errors."""
    out = tmp_path / "h.json"
    rc = cli.main(["harness", "--checkpoint", ckpt2, "--tasks", "choice", "--include-path", str(task_dir[0]),
                   "--batch-size", "4", "--limit", "6", "--output", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "acc_norm" in printed and "choice" in printed
    got = json.loads(out.read_text())
    assert got["P"] == 2
    for k in ("acc,none", "acc_norm,none"):
        assert got["results"]["choice"][k] == results[2]["results"]["choice"][k]
    for argv, what in [(["--tasks", "no_such_task"], "unknown lm-eval task no_such_task"),
                       (["--tasks", "choice", "--batch-size", "0"], "--batch-size 0"),
                       (["--tasks", "choice", "--include-path", str(tmp_path / "nope")], "not a directory")]:
        argv = ["harness", "--checkpoint", ckpt2, *argv]
        if "--include-path" not in argv:
            argv += ["--include-path", str(task_dir[0])]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and what in err[0], err


@pytest.mark.slow
def test_bits_per_byte_equals_eval_py_heldout(models, ckpt2, tmp_path, task_dir, lms, capsys):
    """eval.py's held-out bits per byte over [EOS doc1 EOS doc2 ...] in windows of len(doc) + 1
    tokens scores exactly the documents after EOS: the harness's rolling bits per byte on them."""
    cfg, m, p = models[2]
    rng = np.random.default_rng(0)
    words = ["def", "return", "x", "=", "(", ")", "import", "os", "self", ":", "1", "\n"]
    docs = ["".join(rng.choice(words, 40))[:30].ljust(30, ".") for _ in range(5)]  # 30 bytes each
    ids = np.concatenate([[EOS, *d.encode()] for d in docs]).astype(np.int32)
    np.save(tmp_path / "docs.npy", ids)
    out = tmp_path / "eval.json"
    assert cli.main(["--checkpoint", ckpt2, "--data", str(tmp_path / "docs.npy"), "--tokenizer", "bytes",
                     "--seq-len", "31", "--batch-size", "4", "--output", str(out)]) == 0
    heldout = json.loads(out.read_text())
    assert heldout["windows"] == 5 and heldout["bytes"] == 150
    folder = tmp_path / "t"
    folder.mkdir()
    _json_task(folder, "docs", [{"text": d} for d in docs], output_type="loglikelihood_rolling", doc_to_text="",
               doc_to_target="text", metric_list=[{"metric": "bits_per_byte"}])
    got = _evaluate(lms[2], folder, ["docs"])["results"]["docs"]["bits_per_byte,none"]
    assert abs(got - heldout["bits_per_byte"]) <= 1e-4, (got, heldout["bits_per_byte"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_serve_process_0(ckpt2, task_dir, results, tmp_path):
    """Two JAX processes (one CPU device each): process 0 runs the harness, process 1 serves the
    broadcast batches; every request's result equals the one-process run's."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    procs = []
    for i in range(2):
        argv = [sys.executable, "eval.py", "harness", "--checkpoint", ckpt2, "--tasks", "choice,roll,gen",
                "--include-path", str(task_dir[0]), "--batch-size", "4", "--log-samples", "--output",
                str(tmp_path / f"p{i}.json"), "--coordinator-address", f"localhost:{port}", "--num-processes", "2",
                "--process-id", str(i)]
        procs.append(subprocess.Popen(argv, cwd=Path(__file__).resolve().parents[1], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "processes=2" in outs[0][1] and not (tmp_path / "p1.json").exists()  # process 1 only served
    got = json.loads((tmp_path / "p0.json").read_text())["samples"]
    for task in ("choice", "roll", "gen"):
        one = sorted(results[2]["samples"][task], key=lambda s: s["doc_id"])
        two = sorted(got[task], key=lambda s: s["doc_id"])
        assert len(one) == len(two) > 0
        for a, b in zip(one, two):
            if task == "gen":
                assert a["resps"] == b["resps"]
            elif task == "roll":
                assert abs(a["resps"][0][0] - float(b["resps"][0][0])) <= 1e-4
            else:
                for ra, rb in zip(a["resps"], b["resps"]):
                    assert abs(ra[0][0] - float(rb[0][0])) <= 1e-4
