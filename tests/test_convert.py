"""Conversion to/from Hugging Face, checked by logits against independent implementations:
stock ``transformers`` Qwen2 (P = 1), the PyTorch reference ``torch_ref`` written from the
spec (P > 1), a JAX greedy loop by full recompute, and files read back through torch
(``safe_open(framework="pt")``; the converter itself reads and writes with ``safetensors.numpy``)."""
from __future__ import annotations

import functools
import json
import os
import runpy
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from parscale_jax import convert as C  # noqa: E402
from parscale_jax import loading, recycle  # noqa: E402
from parscale_jax import model as M  # noqa: E402
from parscale_jax.checkpoint import save_params  # noqa: E402
from parscale_jax.config import ModelConfig, preset  # noqa: E402
from parscale_jax.hf import load_hf  # noqa: E402
from parscale_jax.torch_ref import TorchParScale  # noqa: E402

torch.set_num_threads(2)
ATOL = 1e-4
N_NEW = 8
PROMPT = np.array([[5, 17, 33, 2, 90, 11], [7, 8, 9, 300, 301, 12]], np.int32)
TOKENS = np.random.RandomState(1).randint(0, 384, (2, 12))  # one shape: one compile per config
# name -> (P, tied): P=2 tied and P=4 untied, as the issue asks; P=1 untied (a separate lm_head).
VARIANTS = {"P1": (1, False), "P2": (2, True), "P4": (4, False)}


def _build(P: int, tied: bool, seed: int):
    """Random params from the model's abstract shapes (NumPy, no compile): non-trivial norms and
    biases, a larger LM head (clear argmaxes) and larger prefixes and gate (every part matters)."""
    cfg = preset("tiny", parscale_n=P, max_position_embeddings=64, tie_word_embeddings=tied, rope_theta=5000.0)
    rng = np.random.RandomState(seed)

    def draw(kp, leaf):
        keys = [getattr(k, "key", None) for k in kp]
        a = rng.standard_normal(leaf.shape)
        if keys[-1] == "scale":
            a = 1.0 + 0.2 * a
        elif keys[-1] == "bias":
            a = 0.2 * a
        elif keys[0] in ("prefix", "aggregator"):
            a = 0.4 * a
        elif "lm_head" in keys:
            a = 0.16 * a
        elif keys[-2] in ("q", "k", "v", "gate", "up"):
            a = 0.08 * a
        else:
            a = 0.02 * a
        return a.astype(np.float32)

    return cfg, jax.tree_util.tree_map_with_path(draw, M.abstract_params(M.make_model(cfg)))


def _hf_names(cfg: ModelConfig) -> dict[str, tuple]:
    """The spec's tensor list (section 3), written out here independently of the converter."""
    V, H, I, L = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    nH, nKV, hd, P, T = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hd, cfg.parscale_n, cfg.parscale_n_tokens
    out = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, H)
    for i in range(L):
        a = f"model.layers.{i}.self_attn."
        out |= {f"model.layers.{i}.input_layernorm.weight": (H,),
                f"model.layers.{i}.post_attention_layernorm.weight": (H,),
                a + "q_proj.weight": (nH * hd, H), a + "q_proj.bias": (nH * hd,),
                a + "k_proj.weight": (nKV * hd, H), a + "k_proj.bias": (nKV * hd,),
                a + "v_proj.weight": (nKV * hd, H), a + "v_proj.bias": (nKV * hd,),
                a + "o_proj.weight": (H, nH * hd),
                f"model.layers.{i}.mlp.gate_proj.weight": (I, H), f"model.layers.{i}.mlp.up_proj.weight": (I, H),
                f"model.layers.{i}.mlp.down_proj.weight": (H, I)}
        if P > 1:
            out |= {a + "prefix_k": (P, nKV, T, hd), a + "prefix_v": (P, nKV, T, hd)}
    if P > 1:
        out |= {"model.aggregate_layer.0.weight": (H, P * H), "model.aggregate_layer.0.bias": (H,),
                "model.aggregate_layer.2.weight": (P, H), "model.aggregate_layer.2.bias": (P,)}
    return out


def _read_dir(d: str) -> dict[str, np.ndarray]:
    """All tensors of an HF directory via the safetensors library, as float32 numpy."""
    out = {}
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(d, fn), framework="pt") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k).float().numpy()
    return out


def _trees_bitwise(a, b) -> bool:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
                            for x, y in zip(la, lb))


@functools.lru_cache(maxsize=None)
def _fwd(cfg: ModelConfig):
    model = M.make_model(cfg)
    return jax.jit(lambda p, t: model.apply({"params": p}, t)[0])


def _jax_logits(cfg, params, tokens):
    return np.asarray(_fwd(cfg)(params, jnp.asarray(tokens, jnp.int32)))


def _jax_greedy(cfg, params, prompt, n):
    """Greedy by full recompute (no cache): a causal model ignores the not-yet-filled tail."""
    B, S0 = prompt.shape
    buf = np.zeros((B, S0 + n), np.int32)
    buf[:, :S0] = prompt
    for i in range(n):
        buf[:, S0 + i] = _jax_logits(cfg, params, buf)[:, S0 + i - 1].argmax(-1)
    return buf


def _run_cli(capsys, argv):
    rc = C.main(argv)
    err = capsys.readouterr().err
    return rc, err


def _word_tokenizer(V: int):
    """A real (tiny) Hugging Face tokenizer: words "w0".."w{V-1}" are ids 0..V-1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def exports(work):
    """Each variant: a project checkpoint (with a tokenizer next to it) and its float32 export."""
    out = {}
    for seed, (name, (P, tied)) in enumerate(VARIANTS.items()):
        cfg, params = _build(P, tied, seed)
        ckpt = str(work / f"ckpt-{name}")
        save_params(ckpt, cfg, params)
        _word_tokenizer(cfg.vocab_size).save(os.path.join(ckpt, "tokenizer.json"))
        hf = str(work / f"hf-{name}")
        assert C.to_hf(ckpt, hf) == [os.path.abspath(hf)]
        out[name] = dict(cfg=cfg, params=params, ckpt=ckpt, hf=hf)
    return out


# ---- P = 1 against stock transformers --------------------------------------------------------
@pytest.mark.slow
def test_p1_export_loads_in_transformers_with_equal_logits(exports):
    from transformers import Qwen2ForCausalLM

    e = exports["P1"]
    with open(os.path.join(e["hf"], "config.json")) as f:
        conf = json.load(f)
    assert conf["model_type"] == "qwen2" and conf["architectures"] == ["Qwen2ForCausalLM"]
    hf = Qwen2ForCausalLM.from_pretrained(e["hf"], attn_implementation="eager").float().eval()
    tokens = TOKENS
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
        mine = TorchParScale.from_pretrained(e["hf"])(torch.tensor(tokens)).numpy()
    ours = _jax_logits(e["cfg"], e["params"], tokens)
    assert np.abs(ref).max() > 1.0  # logits are not trivially small
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(mine, ref, atol=ATOL, rtol=0)  # the torch reference agrees with transformers
    assert os.path.isfile(os.path.join(e["hf"], "generation_config.json"))
    assert os.path.isfile(os.path.join(e["hf"], "tokenizer.json"))  # copied along


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_random_transformers_qwen2_imports_with_equal_logits(work, capsys, tied):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    hcfg = Qwen2Config(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, rope_theta=20000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=128, tie_word_embeddings=tied, initializer_range=0.1)
    hf = Qwen2ForCausalLM(hcfg).float().eval()
    with torch.no_grad():  # biases and norms are 0 and 1 at init: randomise them so mix-ups show
        for n, p in hf.named_parameters():
            if n.endswith(".bias") or "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    src = str(work / f"transformers-{tied}")
    hf.save_pretrained(src)
    ckpt = str(work / f"imported-{tied}")
    rc, err = _run_cli(capsys, ["from-hf", "--hf", src, "--out", ckpt])
    assert rc == 0, err
    cfg, params = loading.load(ckpt)
    assert (cfg.parscale_n, cfg.tie_word_embeddings, cfg.rope_theta, cfg.rms_norm_eps) == (1, tied, 20000.0, 1e-5)
    assert ("lm_head" in params["backbone"]) == (not tied)
    tokens = np.random.RandomState(2).randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(_jax_logits(cfg, params, tokens), ref, atol=ATOL, rtol=0)


# ---- P > 1 against the PyTorch reference -----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["P2", "P4"])
def test_parscale_export_format_and_torch_reference(exports, name):
    e = exports[name]
    cfg, params = e["cfg"], e["params"]
    with open(os.path.join(e["hf"], "config.json")) as f:
        conf = json.load(f)
    assert conf["model_type"] == "qwen2_parscale" and conf["architectures"] == ["Qwen2ParScaleForCausalLM"]
    assert (conf["parscale_n"], conf["parscale_n_tokens"], conf["parscale_attn_smooth"]) == (
        cfg.parscale_n, cfg.parscale_n_tokens, cfg.parscale_attn_smooth)
    assert conf["tie_word_embeddings"] == cfg.tie_word_embeddings and conf["rope_theta"] == 5000.0
    assert conf["rope_scaling"] is None and conf["use_sliding_window"] is False
    tensors = _read_dir(e["hf"])
    assert {k: tuple(v.shape) for k, v in tensors.items()} == _hf_names(cfg)
    # Prefix of layer 1 stored as [P, nKV, T, hd], unchanged.
    np.testing.assert_array_equal(tensors["model.layers.1.self_attn.prefix_v"], params["prefix"]["v"][1])

    ref = TorchParScale.from_pretrained(e["hf"])
    tokens = TOKENS
    with torch.no_grad():
        theirs = ref(torch.tensor(tokens)).numpy()
    ours = _jax_logits(cfg, params, tokens)
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
    # The streams matter: without the gate's (h, p) order or the prefixes the logits differ.
    assert np.abs(ours - _jax_logits(cfg.replace(parscale_n=1), {"backbone": params["backbone"]}, tokens)).max() > 0.05

    want = _jax_greedy(cfg, params, PROMPT, N_NEW)
    got = ref.generate(torch.tensor(PROMPT, dtype=torch.long), N_NEW).numpy()
    np.testing.assert_array_equal(got, want)
    assert len(set(want[:, PROMPT.shape[1]:].ravel().tolist())) > 2  # not a degenerate constant continuation


@pytest.mark.slow
def test_torch_reference_left_padded_batch_equals_single_rows(exports):
    """The reference's padded batch and its KV cache against unpadded one-row runs."""
    ref = TorchParScale.from_pretrained(exports["P4"]["hf"])
    rows = [[5, 17, 33, 2, 90], [7, 8], [300, 301, 302, 9]]
    S = max(map(len, rows))
    ids = torch.tensor([[0] * (S - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in rows])
    batch = ref.generate(ids, 6, attention_mask=mask)
    with torch.no_grad():
        full = ref(ids, attention_mask=mask)
    for b, r in enumerate(rows):
        one = ref.generate(torch.tensor([r]), 6)
        assert batch[b, S:].tolist() == one[0, len(r):].tolist()
        with torch.no_grad():
            torch.testing.assert_close(full[b, S - len(r):], ref(torch.tensor([r]))[0], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_torch_reference_cli(exports, capsys):
    from parscale_jax import torch_ref

    e = exports["P2"]
    want = _jax_greedy(e["cfg"], e["params"], PROMPT, N_NEW)[0, PROMPT.shape[1]:].tolist()
    assert torch_ref.main([e["hf"], "--ids", *map(str, PROMPT[0]), "--max-new-tokens", str(N_NEW)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ids"] == want
    # Text in and out through the tokenizer.json that the export carried along.
    prompt = " ".join(f"w{i}" for i in PROMPT[0])
    assert torch_ref.main([e["hf"], "--prompt", prompt, "--max-new-tokens", str(N_NEW)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ids"] == want and res["text"].split() == [f"w{i}" for i in want]
    assert torch_ref.main([os.path.dirname(e["hf"]), "--ids", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


# ---- round trips, shards, bf16, multi-P, recycling ----------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_jax_hf_jax_bitwise(exports, work, capsys, name):
    e = exports[name]
    cfg, params = load_hf(e["hf"])
    assert cfg == e["cfg"]
    assert _trees_bitwise(params, e["params"])
    back = str(work / f"back-{name}")
    rc, err = _run_cli(capsys, ["from-hf", "--hf", e["hf"], "--out", back])
    assert rc == 0, err
    cfg2, params2 = loading.load(back)
    assert cfg2 == e["cfg"] and _trees_bitwise(params2, e["params"])
    assert os.path.isfile(os.path.join(back, "tokenizer.json"))


@pytest.mark.slow
def test_sharded_export_round_trips(exports, work, capsys):
    from transformers import Qwen2ForCausalLM

    for name in ("P1", "P4"):
        e = exports[name]
        out = str(work / f"sharded-{name}")
        rc, err = _run_cli(capsys, ["to-hf", "--checkpoint", e["ckpt"], "--out", out, "--max-shard-size", "100KB"])
        assert rc == 0, err
        files = sorted(fn for fn in os.listdir(out) if fn.endswith(".safetensors"))
        assert len(files) >= 3 and not os.path.exists(os.path.join(out, "model.safetensors"))
        with open(os.path.join(out, "model.safetensors.index.json")) as f:
            wm = json.load(f)["weight_map"]
        assert set(wm.values()) == set(files) and set(wm) == set(_hf_names(e["cfg"]))
        for fn in files:  # each shard under the limit unless it holds a single larger tensor
            with safe_open(os.path.join(out, fn), framework="pt") as f:
                assert len(f.keys()) == 1 or os.path.getsize(os.path.join(out, fn)) <= 100_000 + 4096
        cfg, params = load_hf(out)
        assert cfg == e["cfg"] and _trees_bitwise(params, e["params"])
        tokens = TOKENS
        with torch.no_grad():
            if name == "P1":
                ref = Qwen2ForCausalLM.from_pretrained(out).float().eval()(torch.tensor(tokens)).logits.numpy()
            else:
                ref = TorchParScale.from_pretrained(out)(torch.tensor(tokens)).numpy()
        np.testing.assert_allclose(_jax_logits(cfg, params, tokens), ref, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_bfloat16_export_loads(exports, work, capsys):
    from transformers import Qwen2ForCausalLM

    for name in ("P1", "P2"):
        e = exports[name]
        out = str(work / f"bf16-{name}")
        rc, err = _run_cli(capsys, ["to-hf", "--checkpoint", e["ckpt"], "--out", out, "--dtype", "bfloat16"])
        assert rc == 0, err
        with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as f:
            assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
        with open(os.path.join(out, "config.json")) as f:
            assert json.load(f)["torch_dtype"] == "bfloat16"
        # Rounded by torch (not by the converter's codec) for the expectation.
        rounded = jax.tree.map(lambda a: torch.tensor(a).bfloat16().float().numpy(), e["params"])
        cfg, params = load_hf(out)
        assert cfg == e["cfg"] and _trees_bitwise(params, rounded)
        tokens = TOKENS
        with torch.no_grad():
            if name == "P1":
                hf = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
                ref = hf(torch.tensor(tokens)).logits.numpy()
            else:
                ref = TorchParScale.from_pretrained(out)(torch.tensor(tokens)).numpy()
        np.testing.assert_allclose(_jax_logits(cfg, rounded, tokens), ref, atol=ATOL, rtol=0)


def test_multi_p_checkpoint_exports_one_directory_per_p(exports, work, capsys):
    e1 = exports["P1"]
    backbone = e1["params"]["backbone"]
    multi = {"backbone": backbone, "sets": {"P1": {}}}
    singles = {}
    for P in (2, 4):
        cfg_p, other = _build(P, False, 10 + P)
        single = {**other, "backbone": backbone}  # a set over the shared backbone
        singles[P] = (cfg_p, single)
        multi = recycle.add_set(multi, single)
    ckpt = str(work / "ckpt-multi")
    save_params(ckpt, e1["cfg"].replace(parscale_n=4), multi)
    out = str(work / "hf-multi")
    rc, err = _run_cli(capsys, ["to-hf", "--checkpoint", ckpt, "--out", out])
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["P1", "P2", "P4"]
    cfg1, p1 = load_hf(os.path.join(out, "P1"))
    assert cfg1 == e1["cfg"] and _trees_bitwise(p1, {"backbone": backbone})
    for P, (cfg_p, single) in singles.items():
        cfg, params = load_hf(os.path.join(out, f"P{P}"))
        assert cfg == cfg_p and _trees_bitwise(params, single)
    only = str(work / "hf-multi-P2")
    rc, err = _run_cli(capsys, ["to-hf", "--checkpoint", ckpt, "--out", only, "--P", "2"])
    assert rc == 0, err
    assert load_hf(only)[0].parscale_n == 2 and os.path.isfile(os.path.join(only, "config.json"))
    rc, err = _run_cli(capsys, ["to-hf", "--checkpoint", ckpt, "--out", str(work / "hf-multi-P8"), "--P", "8"])
    assert rc == 2 and "[1, 2, 4]" in err and not os.path.exists(work / "hf-multi-P8")


@pytest.mark.slow
def test_from_hf_with_P_adds_fresh_streams(exports, work, capsys):
    e = exports["P1"]
    out = str(work / "recycled-P4")
    rc, err = _run_cli(capsys, ["from-hf", "--hf", e["hf"], "--out", out, "--P", "4"])
    assert rc == 0, err
    cfg, params = loading.load(out)
    assert cfg == e["cfg"].replace(parscale_n=4)
    assert _trees_bitwise(params["backbone"], e["params"]["backbone"])  # backbone kept bitwise
    assert params["prefix"]["k"].shape == (cfg.num_hidden_layers, 4, cfg.num_key_value_heads,
                                           cfg.parscale_n_tokens, cfg.hd)
    assert all(np.isfinite(a).all() and np.abs(a).max() > 0 for a in jax.tree.leaves(params["prefix"]))
    assert np.isfinite(_jax_logits(cfg, params, TOKENS)).all()
    rc, err = _run_cli(capsys, ["from-hf", "--hf", exports["P4"]["hf"], "--out", str(work / "x"), "--P", "2"])
    assert rc == 2 and "P=4" in err


# ---- errors: one line, exit code 2 ---------------------------------------------------------------
def _broken_copy(src: str, dst: str, drop=(), add=None, config=None) -> str:
    shutil.copytree(src, dst)
    if drop or add:
        t = _read_dir(src)
        for k in drop:
            del t[k]
        t.update(add or {})
        save_file(t, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    if config:
        with open(os.path.join(src, "config.json")) as f:
            conf = json.load(f)
        conf.update(config)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(conf, f)
    return dst


def test_errors_are_one_line_with_exit_code_2(exports, work, capsys):
    src = exports["P2"]["hf"]
    bad = work / "bad"
    bad.mkdir()
    (bad / "empty").mkdir()
    pickles = bad / "pickles"
    pickles.mkdir()
    shutil.copy(os.path.join(src, "config.json"), pickles / "config.json")
    (pickles / "pytorch_model.bin").write_bytes(b"not read")
    nan = np.full((64,), np.nan, np.float32)
    cases = {
        "missing": (_broken_copy(src, str(bad / "m"), drop=["model.layers.1.self_attn.prefix_k", "model.norm.weight"]),
                    ["missing tensors", "model.layers.1.self_attn.prefix_k", "model.norm.weight"]),
        "extra": (_broken_copy(src, str(bad / "x"), add={"model.layers.0.self_attn.extra": np.zeros(3, np.float32)}),
                  ["unexpected tensors", "model.layers.0.self_attn.extra"]),
        "shape": (_broken_copy(src, str(bad / "s"), config={"parscale_n_tokens": 8}),
                  ["shape mismatch", "prefix_k expected [2, 2, 8, 16] got [2, 2, 16, 16]"]),
        "sliding": (_broken_copy(src, str(bad / "w"), config={"use_sliding_window": True, "sliding_window": 4}),
                    ["unsupported config", "use_sliding_window"]),
        "rope": (_broken_copy(src, str(bad / "r"), config={"rope_scaling": {"type": "yarn", "factor": 4.0}}),
                 ["unsupported config", "rope_scaling"]),
        "arch": (_broken_copy(src, str(bad / "l"), config={"model_type": "llama"}), ["model_type 'llama'"]),
        "nan": (_broken_copy(src, str(bad / "n"), add={"model.norm.weight": nan}), ["NaN"]),
        "empty": (str(bad / "empty"), ["not a model directory", "config.json"]),
        "pickle": (str(pickles), ["pickle", "safetensors"]),
        "project-ckpt": (exports["P2"]["ckpt"], ["to-hf"]),
    }
    for case, (hf_dir, words) in cases.items():
        out = str(work / f"err-{case}")
        rc, err = _run_cli(capsys, ["from-hf", "--hf", hf_dir, "--out", out])
        assert rc == 2, (case, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (case, err)
        assert all(w in err for w in words), (case, err)
        assert not os.path.exists(out)
    ckpt = exports["P2"]["ckpt"]
    to_cases = {
        "not-ckpt": (["--checkpoint", src], "model_config.json"),
        "exists": (["--checkpoint", ckpt, "--out", exports["P1"]["hf"]], "already exists"),
        "size": (["--checkpoint", ckpt, "--max-shard-size", "lots"], "--max-shard-size"),
        "P": (["--checkpoint", ckpt, "--P", "3"], "P=3"),
    }
    for case, (args, word) in to_cases.items():
        argv = ["to-hf", *args] + ([] if "--out" in args else ["--out", str(work / f"err-to-{case}")])
        rc, err = _run_cli(capsys, argv)
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and word in err, (case, err)


def test_command_line_exit_code(exports, work, capsys, monkeypatch):
    """`python -m parscale_jax.convert` as Python runs it (its __main__ block, in-process): exit
    status 2 and one line on stderr, no traceback."""
    argv = ["from-hf", "--hf", str(work / "nowhere"), "--out", str(work / "cli-out")]
    monkeypatch.setattr(sys, "argv", ["parscale_jax.convert", *argv])
    monkeypatch.delitem(sys.modules, "parscale_jax.convert")  # run afresh as __main__, as `python -m` does
    with pytest.raises(SystemExit) as e:
        runpy.run_module("parscale_jax.convert", run_name="__main__", alter_sys=True)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
