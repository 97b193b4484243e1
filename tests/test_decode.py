"""KV-cached generation against independent computations: full no-cache forwards over the
padded sequence at every step, an argmax loop, NumPy top-k/top-p, and sampling frequencies."""
from __future__ import annotations

import copy
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parscale_jax import decode as D
from parscale_jax import model as M
from parscale_jax.checkpoint import save_params
from parscale_jax.cli import eval as eval_cli
from parscale_jax.config import preset

PAD = 256
PROMPTS = [[5, 17, 33, 2, 90], [7, 8, 9, 10, 11, 12, 13, 14, 15], [300, 301]]  # ragged: left padding
N_NEW = 10


@functools.lru_cache(maxsize=None)  # built once per P for the whole module (never mutated)
def _build(P: int):
    cfg = preset("tiny", parscale_n=P, max_position_embeddings=64, tie_word_embeddings=False)
    model = M.make_model(cfg)
    params = jax.jit(functools.partial(M.init_params, model))(jax.random.PRNGKey(P))
    # Bigger embeddings and head (clear argmaxes), prefixes and gate weights: every part matters.
    params["backbone"]["embed"]["embedding"] = params["backbone"]["embed"]["embedding"] * 20.0
    params["backbone"]["lm_head"]["kernel"] = params["backbone"]["lm_head"]["kernel"] * 20.0
    if P > 1:
        params["prefix"] = jax.tree.map(lambda a: a * 30.0, params["prefix"])
        params["aggregator"] = jax.tree.map(lambda a: a * 25.0, params["aggregator"])
    return cfg, model, params


@pytest.fixture(scope="module", params=[1, 4], ids=["P1", "P4"])
def setup(request):
    cfg, model, params = _build(request.param)

    @jax.jit
    def full_logits(p, tokens, mask):
        """No cache: the whole (fixed-length, padded) sequence recomputed from scratch."""
        return model.apply({"params": p}, tokens, attention_mask=mask)[0].astype(jnp.float32)

    gen = D.Generator(model, params, eos_id=None, pad_id=PAD, chunk=4)
    return cfg, model, params, full_logits, gen


def make_step(model):
    """One cached decode step, written here from the model's cache API (the code under test
    decodes in compiled chunks instead): (params, cache, token [B], valid [B]) -> (logits, cache)."""

    @jax.jit
    def step(params, cache, token, valid):
        logits, cache = model.apply({"params": params}, token[:, None], attention_mask=valid[:, None], cache=cache)
        return logits[:, 0].astype(jnp.float32), cache

    return step


def _buffer(prompts, total, S=None):
    """Left-padded prompts (to S) in a fixed [B, total] buffer (room for new tokens on the right)."""
    toks, mask = D.left_pad(prompts, PAD, S)
    S = toks.shape[1]
    buf = np.full((len(prompts), total), PAD, np.int32)
    bmask = np.ones((len(prompts), total), bool)
    buf[:, :S], bmask[:, :S] = toks, mask
    return buf, bmask, S


def reference_greedy(full_logits, params, prompts, n_new):
    """Independent argmax loop: at every step a full no-cache forward over the padded sequence."""
    S = max(map(len, prompts))
    buf, bmask, _ = _buffer(prompts, S + n_new)
    for j in range(n_new):
        # Slots after S + j - 1 still hold placeholders; causal attention keeps them out of it.
        logits = np.asarray(full_logits(params, buf, bmask))
        buf[:, S + j] = logits[:, S + j - 1].argmax(-1)
    return buf[:, S:]


S_MAX = max(map(len, PROMPTS))
TOTAL = S_MAX + N_NEW  # every reference forward uses this one length: one compilation


@pytest.mark.slow
def test_cached_steps_match_full_forward(setup):
    cfg, model, params, full_logits, gen = setup
    rng = np.random.default_rng(0)
    fed = rng.integers(0, 256, size=(len(PROMPTS), 6)).astype(np.int32)  # teacher-forced tokens
    buf, bmask, S = _buffer(PROMPTS, TOTAL)
    buf[:, S:S + 6] = fed
    step = make_step(model)
    cache = M.init_cache(model, params, len(PROMPTS), S + 6)
    logits, cache = gen.prefill(params, cache, buf[:, :S], bmask[:, :S])
    ref = np.asarray(full_logits(params, buf, bmask))  # whole padded sequence, no cache
    np.testing.assert_allclose(np.asarray(logits), ref[:, S - 1], atol=1e-5, rtol=0)
    assert np.abs(ref[:, S - 1]).max() > 1.0  # not trivially comparing near-zeros
    for j in range(6):
        logits, cache = step(params, cache, jnp.asarray(fed[:, j]), jnp.ones(len(PROMPTS), bool))
        buf_j = buf.copy()
        buf_j[:, S + j + 1:] = rng.integers(0, 256, size=buf_j[:, S + j + 1:].shape)  # future: arbitrary
        ref = np.asarray(full_logits(params, buf_j, bmask))  # recomputed from scratch at every step
        np.testing.assert_allclose(np.asarray(logits), ref[:, S + j], atol=1e-5, rtol=0)
    assert int(cache["index"]) == S + 6
    assert cache["k"].shape[:4] == (cfg.parscale_n, cfg.num_hidden_layers, len(PROMPTS), cfg.prefix_len + S + 6)


@pytest.mark.slow
def test_repeated_kv_head_cache_matches_full_forward(setup):
    """A cache storing each KV head twice (``kv_repeat=2``: the decode layout that splits 2 KV
    heads over a tensor axis of 4) gives the no-cache forward's logits; its heads are copies."""
    cfg, model, params, full_logits, gen = setup
    fed = np.array([[40, 41, 42], [50, 51, 52], [60, 61, 62]], np.int32)
    buf, bmask, S = _buffer(PROMPTS, TOTAL)
    buf[:, S:S + 3] = fed
    step = make_step(model)
    cache = M.init_cache(model, params, len(PROMPTS), S + 3, kv_repeat=2)
    assert cache["k"].shape[-2] == 2 * cfg.num_key_value_heads
    logits, cache = gen.prefill(params, cache, buf[:, :S], bmask[:, :S])
    for j in range(3):
        logits, cache = step(params, cache, jnp.asarray(fed[:, j]), jnp.ones(len(PROMPTS), bool))
    ref = np.asarray(full_logits(params, buf, bmask))  # whole padded sequence, no cache
    np.testing.assert_allclose(np.asarray(logits), ref[:, S + 2], atol=1e-5, rtol=0)
    k = np.asarray(cache["k"])
    np.testing.assert_array_equal(k[..., 0::2, :], k[..., 1::2, :])  # head j at slots 2j and 2j+1
    assert np.abs(k[..., cfg.prefix_len + S + 2, :, :]).max() > 0  # the last token was written


@pytest.mark.slow
def test_reorder_cache_moves_all_streams(setup):
    cfg, model, params, full_logits, gen = setup
    order = np.array([2, 0, 0])
    fed = np.array([[40, 41], [50, 51], [60, 61]], np.int32)
    step = make_step(model)
    toks, mask = D.left_pad(PROMPTS, PAD)
    S = toks.shape[1]
    cache = M.init_cache(model, params, 3, S + 2)
    _, cache = gen.prefill(params, cache, toks, mask)
    _, cache = step(params, cache, jnp.asarray(fed[:, 0]), jnp.ones(3, bool))
    moved = D.reorder_cache(cache, order)
    # every stream and layer moved as a unit along the batch axis (axis 2), valid along axis 0
    np.testing.assert_array_equal(np.asarray(moved["k"]), np.asarray(cache["k"])[:, :, order])
    np.testing.assert_array_equal(np.asarray(moved["v"]), np.asarray(cache["v"])[:, :, order])
    np.testing.assert_array_equal(np.asarray(moved["valid"]), np.asarray(cache["valid"])[order])
    nxt = fed[order, 1]
    logits, _ = step(params, moved, jnp.asarray(nxt), jnp.ones(3, bool))
    # independent: the reordered rows recomputed from scratch
    buf, bmask, _ = _buffer([PROMPTS[i] for i in order], TOTAL, S)
    buf[:, S] = fed[order, 0]
    buf[:, S + 1] = nxt
    ref = np.asarray(full_logits(params, buf, bmask))
    np.testing.assert_allclose(np.asarray(logits), ref[:, S + 1], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_greedy_matches_argmax_loop_and_stops_at_eos(setup):
    cfg, model, params, full_logits, gen = setup
    ref = reference_greedy(full_logits, params, PROMPTS, N_NEW)
    assert len(np.unique(ref)) > 3  # not a degenerate repeat-one-token model
    chunks = []
    out = gen.generate(PROMPTS, N_NEW, D.Sampling(0.0), on_chunk=chunks.append)
    np.testing.assert_array_equal(np.stack(out), ref)
    assert sum(c.shape[1] for c in chunks) == N_NEW  # streamed in pieces, nothing past N
    again = gen.generate(PROMPTS, N_NEW, D.Sampling(0.0), seed=123)  # deterministic; seed unused
    np.testing.assert_array_equal(np.stack(again), ref)
    # EOS: take row 0's 4th greedy token as EOS; each row stops at its first EOS (kept), nothing after.
    eos = int(ref[0, 3])
    gen_eos = copy.copy(gen)  # shares the compiled functions (EOS is a traced value)
    gen_eos.eos_id = eos
    out = gen_eos.generate(PROMPTS, N_NEW, D.Sampling(0.0))
    for row, r in zip(out, ref):
        hits = np.flatnonzero(r == eos)
        np.testing.assert_array_equal(row, r[: hits[0] + 1] if len(hits) else r)
    assert len(out[0]) <= 4


@pytest.mark.slow
def test_sampling_reproducible_and_seeded(setup):
    cfg, model, params, _, gen = setup
    s = D.Sampling(temperature=1.0, top_k=50, top_p=0.95)
    a = np.stack(gen.generate(PROMPTS, N_NEW, s, seed=7))
    b = np.stack(gen.generate(PROMPTS, N_NEW, s, seed=7))
    c = np.stack(gen.generate(PROMPTS, N_NEW, s, seed=8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    if cfg.parscale_n == 1:  # the same text whatever the chunk size (keys fold in the step number)
        other = D.Generator(model, params, eos_id=None, pad_id=PAD, chunk=3)
        np.testing.assert_array_equal(np.stack(other.generate(PROMPTS, N_NEW, s, seed=7)), a)


def _np_filter(logits, top_k, top_p):
    """NumPy reference: keep the top_k largest, then the smallest top set with mass >= top_p."""
    out = logits.astype(np.float64).copy()
    for row in out:
        order = np.argsort(-row, kind="stable")
        if top_k:
            row[order[top_k:]] = -np.inf
        p = np.exp(row - row.max())
        p /= p.sum()
        cum, keep = 0.0, []
        for i in np.argsort(-row, kind="stable"):
            if cum >= top_p:
                break
            keep.append(i)
            cum += p[i]
        drop = np.setdiff1d(np.arange(len(row)), keep)
        row[drop] = -np.inf
    return out


def test_filter_logits_against_numpy():
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (6, 40)) * 3.0, np.float32)
    for k, p in [(5, 1.0), (0, 0.6), (8, 0.5), (0, 0.999), (1, 1.0)]:
        got = np.asarray(D.filter_logits(jnp.asarray(logits), k, p))
        want = _np_filter(logits, k, p)
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=f"top_k={k} top_p={p}")


def test_sampling_frequencies():
    """Temperature + nucleus: empirical frequencies match the renormalised kept probabilities."""
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
    s = D.Sampling(temperature=0.7, top_k=0, top_p=0.8)
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    draws = np.asarray(jax.vmap(lambda k: D.sample(logits, k, s))(keys))[:, 0]
    z = np.asarray(logits[0], np.float64) / 0.7
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = (np.cumsum(p) - p) < 0.8  # sorted already
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    freq = np.bincount(draws, minlength=6) / len(draws)
    np.testing.assert_allclose(freq, q, atol=0.015)
    assert freq[~keep].sum() == 0


# ---- command line ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg, model, params = _build(4)
    path = str(tmp_path_factory.mktemp("dec") / "model")
    save_params(path, cfg, params)
    return path, cfg, model, params


@pytest.mark.slow
def test_cli_generate_greedy(ckpt, tmp_path, capsys):
    path, cfg, model, params = ckpt
    out = str(tmp_path / "gen.json")
    rc = eval_cli.main(["generate", "--checkpoint", path, "--prompt", "def f(x):", "--max-new-tokens", "7",
                     "--no-stop", "--chunk", "3", "--output", out])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    got = json.load(open(out))["generations"][0]["tokens"]

    @jax.jit
    def full(p, t):
        return model.apply({"params": p}, t)[0]

    prompt = list(b"def f(x):")
    seq = np.array([prompt + [PAD] * 7], np.int32)  # fixed length: one compilation
    for j in range(7):  # independent argmax loop, no cache
        seq[0, len(prompt) + j] = int(np.asarray(full(params, seq))[0, len(prompt) + j - 1].argmax())
    seq = seq[0].tolist()
    assert got == seq[-7:]
    # streamed text = the prompt, then the new tokens decoded (ids >= 256 are no bytes)
    assert stdout == "def f(x):" + bytes(t for t in got if t < 256).decode("utf-8", "replace") + "\n"

