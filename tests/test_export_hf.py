"""Self-contained Hugging Face exports (``convert to-hf``), checked from the outside.

Everything PyTorch runs in one fresh subprocess that cannot import this project (``parscale_jax``
is blocked there) and whose Hugging Face caches (hub, remote-code modules, datasets) are empty
directories of the test, on export directories that hold nothing but what ``to-hf`` wrote:

* ``AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).generate`` against the JAX
  generator's greedy tokens (``decode.Generator``) at P = 1 (stock ``Qwen2ForCausalLM``), 2 (tied
  embeddings) and 4, on a left-padded batch;
* ``AutoTokenizer.from_pretrained(export)`` against the project's ``ByteTokenizer`` (varied text,
  invalid UTF-8 in decoding) and against a copied ``tokenizer.json`` read by ``HFTokenizer``;
* lm-eval's ``hf`` backend (``HFLM(pretrained=export, trust_remote_code=True)``, float32, CPU) against
  the project's ``parscale-jax`` adapter (``harness.JaxLM``) on the same checkpoint: >= 200
  loglikelihood requests (an empty context, contexts ending in a space, contexts longer than
  ``max_length``), rolling log-likelihoods, ``generate_until`` on 20 prompts and a multiple-choice
  task's acc / acc_norm.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = [pytest.mark.torch, pytest.mark.slow]

from parscale_jax import convert, data, harness, loading, tasks  # noqa: E402
from parscale_jax import decode as D  # noqa: E402
from parscale_jax import model as M  # noqa: E402
from parscale_jax.checkpoint import save_params  # noqa: E402
from parscale_jax.config import preset  # noqa: E402
from parscale_jax.data.tokenizer import is_byte_tokenizer_json  # noqa: E402

POS = 64        # the models' positions
MAX_LEN = 48    # lm-eval's max_length on both sides (contexts longer than this are cut from the left)
N_NEW = 12
MAX_GEN = 10
BATCH = 8
EOS, PAD = 258, 256
VARIANTS = {1: False, 2: True, 4: False}  # P -> tied embeddings
PARITY_P = 4
LL_TOL, ROLLING_TOL = 1e-4, 1e-3
GEN_PROMPTS = ["def f(", "hello world", "x", "The cat sat on the mat and", "naïve café ", "日本語",
               "for i in range(10):\n    ", "a" * 30]
TEXTS = ["", "hello world", "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "naïve café, Ünïcödé",
         "日本語のテキスト", "emoji 🎉🚀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "a<|endoftext|>b<|pad|><|bos|>", "\x00\x01\x7f control",
         "mixed: ascii, ελληνικά, русский, עברית, العربية"]


def _params(cfg, seed: int):
    """Random params (NumPy, no compile) with clear argmaxes: non-trivial norms and biases, a large
    LM head, prefixes and gate large enough that the streams matter. Tied: a larger embedding and
    larger output projections (else the model mostly repeats its last input token)."""
    rng = np.random.RandomState(seed)
    tied = cfg.tie_word_embeddings

    def draw(kp, leaf):
        keys = [getattr(k, "key", None) for k in kp]
        a = rng.standard_normal(leaf.shape)
        scale = (0.2 if keys[-1] in ("scale", "bias") else 0.4 if keys[0] in ("prefix", "aggregator")
                 else 0.16 if "lm_head" in keys else 0.1 if "embed" in keys and tied
                 else 0.08 if keys[-2] in ("q", "k", "v", "gate", "up") else 0.2 if tied else 0.02)
        return ((1.0 if keys[-1] == "scale" else 0.0) + scale * a).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, M.abstract_params(M.make_model(cfg)))


def _word_tokenizer(path: str) -> None:
    """A real (tiny) Hugging Face tokenizer.json with an end-of-text token, no tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({**{f"w{i}": i for i in range(300)}, "[UNK]": 300}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok.save(path)


def _requests(seed: int = 0) -> list[tuple[str, str]]:
    """>= 200 (context, continuation) pairs: empty contexts, contexts ending in a space, contexts
    longer than MAX_LEN bytes, non-ASCII text, continuations with and without a leading space."""
    r = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "déjà", "vu", "日本", "x", "=", "(", ")", "def", "f", "1"]
    phrase = lambda n: " ".join(r.choice(words) for _ in range(n))  # noqa: E731
    out = [("", "hello"), ("", " the cat"), ("hello ", "world"), ("the cat ", "sat"), ("a  ", " b"), ("x\n", "y")]
    while len(out) < 210:
        kind = len(out) % 5
        ctx = "" if kind == 0 else phrase(r.randint(15, 30)) if kind == 1 else phrase(r.randint(1, 6))
        if kind == 2:
            ctx += " "
        cont = (" " if r.random() < 0.5 else "") + phrase(r.randint(1, 3))
        out.append((ctx, cont))
    return out


def _documents() -> list[str]:
    r = random.Random(1)
    return ["short", "naïve café " * 3] + [" ".join(r.choice(["alpha", "beta", "γ", "δέλτα", "\n", "42"])
                                                    for _ in range(n)) for n in (10, 25, 40, 60)]


def _gen_requests() -> list[tuple[str, dict]]:
    r = random.Random(2)
    prompts = [p for p in GEN_PROMPTS] + [" ".join(r.choice(["x", "y", "zz", "é"]) for _ in range(r.randint(2, 30)))
                                          for _ in range(12)]
    stops = [["\n"], ["e"], ["x", "y"], ["\n\n", "é"]]
    return [(p, {"until": stops[i % 4], "max_gen_toks": MAX_GEN, "do_sample": False}) for i, p in enumerate(prompts)]


MC_RECORDS = [{"context": f"Q{i}: {c}", "choices": ch, "answer": a} for i, (c, ch, a) in enumerate([
    ("2 + 2 =", [" 4", " 5", " 22"], 0), ("the cat sat on the", [" mat", " hat", " dog"], 0),
    ("naïve", [" café", " cafe", "!"], 1), ("def f(", ["x):", "):", "self, x):"], 2),
    ("日本", ["語", "人", "酒"], 0), ("hello", [" world", " there", ", world"], 1),
    ("for i in", [" range(3):", " x:", " [1, 2]:"], 0), ("", ["a", "bb", "ccc"], 2),
    ("a b c", [" d", " e", " f"], 0), ("Ünïcödé ", ["text", "bytes", "tokens"], 1),
    ("x = ", ["1", "2", "3"], 2), ("yes or", [" no", " maybe", " yes"], 0),
])]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """P -> (cfg, params, checkpoint, export): checkpoints of this project and their exports."""
    root = tmp_path_factory.mktemp("export_hf")
    out = {}
    for P, tied in VARIANTS.items():
        cfg = preset("tiny", parscale_n=P, max_position_embeddings=POS, tie_word_embeddings=tied)
        params = _params(cfg, 10 + P)
        ckpt, hf = str(root / f"ckpt-P{P}"), str(root / f"hf-P{P}")
        save_params(ckpt, cfg, params)
        assert convert.main(["to-hf", "--checkpoint", ckpt, "--out", hf]) == 0
        out[P] = (cfg, params, ckpt, hf)
    word = str(root / "ckpt-word")  # a checkpoint whose tokenizer.json is a Hugging Face one
    save_params(word, out[2][0], out[2][1])
    _word_tokenizer(os.path.join(word, "tokenizer.json"))
    convert.to_hf(word, str(root / "hf-word"))
    out["word"] = (None, None, word, str(root / "hf-word"))
    return out


@pytest.fixture(scope="module")
def choice_task(tmp_path_factory):
    jsonl = tmp_path_factory.mktemp("choice") / "choice.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in MC_RECORDS))
    return tasks.write_task_dir(str(jsonl))


class _Torch:
    """The PyTorch side, started once in a fresh subprocess; ``result()`` waits for its JSON."""

    def __init__(self, spec: dict, work):
        spec_path, self.out = work / "spec.json", work / "torch_side.json"
        spec_path.write_text(json.dumps(spec))
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "export_hf_torch_side.py")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
        env.update(HF_HOME=str(work / "hf"), HF_MODULES_CACHE=str(work / "modules"), HF_HUB_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_CACHE=str(work / "datasets"),
                   PYTHONPATH="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen([sys.executable, script, str(spec_path), str(self.out)], cwd=str(work), env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self._res = None

    def result(self) -> dict:
        if self._res is None:
            log, _ = self.proc.communicate(timeout=600)
            assert self.proc.returncode == 0, log[-4000:]
            self._res = json.loads(self.out.read_text())
            self._res["log"] = log
        return self._res


@pytest.fixture(scope="module")
def ll_requests(exports):
    """_requests() and, so that greedy flags are True too, contexts continued by the parity model's
    own greedy bytes (ASCII ones; the JAX generator decides them)."""
    cfg, params = exports[PARITY_P][:2]
    r = random.Random(4)
    contexts = ["".join(r.choice("abcdefgh xyz(=)") for _ in range(r.randint(3, 40))).rstrip() + "q"
                for _ in range(48)]
    bt = data.ByteTokenizer()
    gen = D.Generator(M.make_model(cfg), params, eos_id=EOS, pad_id=PAD)
    out = []
    for ctx, toks in zip(contexts, gen.generate([bt.encode(c).tolist() for c in contexts], 3)):
        ascii_ = list(itertools.takewhile(lambda t: 0 < t < 128, toks.tolist()))
        if ascii_:
            out.append((ctx, bytes(ascii_).decode()))
    return _requests() + out


@pytest.fixture(scope="module")
def torch_side(exports, choice_task, ll_requests, tmp_path_factory):
    spec = {"exports": {str(P): exports[P][3] for P in VARIANTS}, "word_export": exports["word"][3],
            "parity_export": exports[PARITY_P][3], "prompts": GEN_PROMPTS[:4], "n_new": N_NEW, "texts": TEXTS,
            "decode_ids": _decode_cases(), "requests": ll_requests, "documents": _documents(),
            "gen_requests": _gen_requests(), "max_length": MAX_LEN, "batch_size": BATCH,
            "task_dir": choice_task, "task": "choice"}
    t = _Torch(spec, tmp_path_factory.mktemp("torch_side"))
    yield t
    if t.proc.poll() is None:
        t.proc.kill()
        t.proc.wait()


def _decode_cases() -> list[list[int]]:
    """Id lists: every single byte, invalid UTF-8 (lone continuation bytes, truncated and overlong
    sequences, surrogates), special ids and ids past the tokenizer, random byte strings."""
    r = random.Random(3)
    cases = [[b] for b in range(256)] + [[0xE6, 0x97], [0xF0, 0x9F, 0x8E], [0xC0, 0xAF], [0xED, 0xA0, 0x80],
                                         [0x80, 0x61], [0xFF, 0xFE, 0x41], [97, EOS, 98, PAD, 257, 99], [97, 300, 98]]
    cases += [[r.randrange(256) for _ in range(r.randint(1, 24))] for _ in range(200)]
    return cases


# ---- the exports' files ---------------------------------------------------------------------------
def test_export_directories_hold_what_to_hf_writes(exports):
    common = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json"}
    code = {"configuration_qwen2_parscale.py", "modeling_qwen2_parscale.py", "torch_ref.py"}
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "parscale_jax")
    for P in VARIANTS:
        hf = exports[P][3]
        assert set(os.listdir(hf)) == common | (code if P > 1 else set())
        with open(os.path.join(hf, "config.json")) as f:
            conf = json.load(f)
        if P == 1:
            assert conf["model_type"] == "qwen2" and "auto_map" not in conf
            continue
        assert conf["model_type"] == "qwen2_parscale" and conf["architectures"] == ["Qwen2ParScaleForCausalLM"]
        assert conf["auto_map"] == {"AutoConfig": "configuration_qwen2_parscale.Qwen2ParScaleConfig",
                                    "AutoModelForCausalLM": "modeling_qwen2_parscale.Qwen2ParScaleForCausalLM"}
        assert (conf["parscale_n"], conf["tie_word_embeddings"]) == (P, VARIANTS[P])
        for fn in code:  # one source of truth: the package's own modules, copied
            with open(os.path.join(hf, fn)) as a, open(os.path.join(here, fn)) as b:
                assert a.read() == b.read()
        with open(os.path.join(hf, "generation_config.json")) as f:
            gen = json.load(f)
        assert (gen["eos_token_id"], gen["pad_token_id"]) == (EOS, PAD)


def test_byte_tokenizer_files_load_back_as_the_byte_tokenizer(exports, tmp_path):
    """The project reads the byte tokenizer's Hugging Face files as ByteTokenizer (same fingerprint),
    and only those: another special token makes it a Hugging Face tokenizer again."""
    assert isinstance(data.load_tokenizer(exports[2][3]), data.ByteTokenizer)
    assert loading.tokenizer_of(exports[2][3]) is None  # bytes, by the loader's rule
    assert not is_byte_tokenizer_json(exports["word"][3])
    with open(os.path.join(exports[2][3], "tokenizer.json")) as f:
        tj = json.load(f)
    tj["added_tokens"][-1]["content"] = "</s>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    assert not is_byte_tokenizer_json(str(tmp_path)) and data.load_tokenizer(str(tmp_path)).eos_id == EOS


# ---- transformers alone ---------------------------------------------------------------------------
def test_generate_equals_the_jax_generator(exports, torch_side):
    bt = data.ByteTokenizer()
    prompts = [bt.encode(p).tolist() for p in GEN_PROMPTS[:4]]
    want = {}
    for P in VARIANTS:
        cfg, params = exports[P][:2]
        gen = D.Generator(M.make_model(cfg), params, eos_id=EOS, pad_id=PAD)
        want[P] = [row.tolist() for row in gen.generate(prompts, N_NEW)]
    res = torch_side.result()["generate"]
    for P in VARIANTS:
        got = res[str(P)]
        assert got["prompt_ids"] == prompts
        assert got["class"] == ("transformers.models.qwen2.modeling_qwen2.Qwen2ForCausalLM" if P == 1 else
                                "modeling_qwen2_parscale.Qwen2ParScaleForCausalLM")
        rows = [r[: r.index(EOS) + 1] if EOS in r else r for r in got["new_ids"]]
        assert rows == want[P], P
        assert len({t for r in rows for t in r}) > 4  # not a degenerate continuation
        assert got["no_cache_ids"] == got["new_ids"]  # the DynamicCache path equals full recompute
        assert got["beam_cache_equals_recompute"]


def test_auto_tokenizer_equals_the_byte_tokenizer(torch_side):
    bt = data.ByteTokenizer()
    tok = torch_side.result()["tokenizer"]
    assert tok["special"] == {"eos": EOS, "pad": PAD, "bos": None, "len": 259, "bos_257": "<|bos|>"}
    assert tok["encode"] == [bt.encode(t).tolist() for t in TEXTS]
    assert tok["round_trip"] == TEXTS
    assert tok["decode"] == [bt.decode(ids) for ids in _decode_cases()]
    assert tok["p1_encode"] == tok["encode"]  # the P = 1 export's tokenizer (no config with auto_map)


def test_copied_tokenizer_gets_a_config_with_its_eos(exports, torch_side):
    hf = data.HFTokenizer(os.path.join(exports["word"][2], "tokenizer.json"))
    got = torch_side.result()["word"]
    assert got["eos"] == hf.eos_id and got["pad"] == hf.pad_id
    assert got["ids"] == hf.encode("w1 w2 w299 <|endoftext|> w3").tolist()


# ---- lm-eval's hf backend against the parscale-jax adapter ----------------------------------------
@pytest.fixture(scope="module")
def jax_lm(exports):
    return harness.JaxLM(checkpoint=exports[PARITY_P][2], batch_size=BATCH, max_length=MAX_LEN)


def _instances(kind: str, args: list) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, tuple(a), i) for i, a in enumerate(args)]


def test_loglikelihood_parity_with_lm_eval_hf(jax_lm, ll_requests, torch_side):
    reqs = ll_requests
    assert len(reqs) >= 200 and ("", "hello") in reqs and any(c.endswith(" ") for c, _ in reqs)
    bt = data.ByteTokenizer()
    assert sum(len(bt.encode(c + x)) > MAX_LEN + 1 for c, x in reqs) >= 30  # cut from the left
    mine = jax_lm.loglikelihood(_instances("loglikelihood", reqs), disable_tqdm=True)
    theirs = torch_side.result()["loglikelihood"]
    diff = np.abs(np.array([m[0] for m in mine]) - np.array([t[0] for t in theirs]))
    print(f"loglikelihood: {len(reqs)} requests, max |diff| {diff.max():.3g}")
    assert diff.max() <= LL_TOL
    assert [m[1] for m in mine] == [t[1] for t in theirs]
    assert sum(t[1] for t in theirs) >= 5 and not all(t[1] for t in theirs)  # both flag values occur


def test_rolling_parity_with_lm_eval_hf(jax_lm, torch_side):
    docs = _documents()
    mine = jax_lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(d,) for d in docs]), disable_tqdm=True)
    theirs = torch_side.result()["rolling"]
    diff = np.abs(np.array(mine) - np.array(theirs))
    print(f"rolling: {len(docs)} documents, max |diff| {diff.max():.3g}")
    assert diff.max() <= ROLLING_TOL


def test_generate_until_parity_with_lm_eval_hf(jax_lm, torch_side):
    reqs = _gen_requests()
    assert len(reqs) == 20
    mine = jax_lm.generate_until(_instances("generate_until", reqs), disable_tqdm=True)
    theirs = torch_side.result()["generate_until"]
    assert mine == theirs
    assert len(set(mine)) > 10 and any(len(s) >= 3 for s in mine)


def test_task_metrics_parity_with_lm_eval_hf(jax_lm, choice_task, torch_side):
    import lm_eval
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(model=jax_lm, tasks=["choice"], bootstrap_iters=0, log_samples=True,
                                  task_manager=TaskManager(include_path=choice_task, include_defaults=False))
    theirs = torch_side.result()["task"]
    mine = {k: res["results"]["choice"][k] for k in ("acc,none", "acc_norm,none")}
    assert mine == theirs["metrics"]
    lls = [[r[0] for r in s["filtered_resps"]] for s in sorted(res["samples"]["choice"], key=lambda s: s["doc_id"])]
    assert np.abs(np.array(lls) - np.array(theirs["lls"])).max() <= LL_TOL
