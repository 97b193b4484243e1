"""Attention implementations against a float64 NumPy reference (prefix, causal mask, left
padding; outputs and gradients), the whole model per implementation against a float64 NumPy
forward, and KV-cached decoding against recomputation.

``splash`` runs in the Pallas interpreter here (``splash_interpret``), ``cudnn`` cannot run
without a GPU: selecting it on the CPU must be a one-line error.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parscale_jax import attention as A
from parscale_jax import hf
from parscale_jax import model as M
from parscale_jax.config import diff as config_diff
from parscale_jax.config import preset
from parscale_jax.errors import UserError

from test_model import np_stream_states

IMPLS = ["xla", "chunked", "splash_interpret"]
B, S, NH, NKV, HD, T = 2, 11, 4, 2, 8, 5
PADS = (0, 4)  # left padding of each row


# ---- float64 NumPy reference -----------------------------------------------------------------
def np_attention(q, k, v, prefix, valid):
    """The rule of parscale_jax.attention in float64 loops over rows and heads: a real query sees
    the prefix and the real tokens up to itself; a padded query the padding up to itself.
    Returns (out, backward) where backward(dout) -> (dq, dk, dv, dpk, dpv)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    pk, pv = (np.zeros((0, NKV, HD)), np.zeros((0, NKV, HD))) if prefix is None else \
        (np.asarray(x, np.float64) for x in prefix)
    Tn = pk.shape[0]
    scale = HD ** -0.5
    out = np.zeros_like(q)
    cache = {}
    for b in range(B):
        for h in range(NH):
            g = h // (NH // NKV)
            keys = np.concatenate([pk[:, g], k[b, :, g]])
            vals = np.concatenate([pv[:, g], v[b, :, g]])
            allowed = np.zeros((S, Tn + S), bool)
            for i in range(S):
                for j in range(S):
                    allowed[i, Tn + j] = j <= i and valid[b, j] == valid[b, i]
                allowed[i, :Tn] = valid[b, i]
            s = np.where(allowed, q[b, :, h] @ keys.T * scale, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, :, h] = p @ vals
            cache[b, h] = (g, keys, vals, p)

    def backward(dout):
        dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
        dpk, dpv = np.zeros_like(pk), np.zeros_like(pv)
        for (b, h), (g, keys, vals, p) in cache.items():
            do = dout[b, :, h]
            dp = do @ vals.T
            ds = p * (dp - (p * dp).sum(-1, keepdims=True)) * scale
            dq[b, :, h] += ds @ keys
            dkeys, dvals = ds.T @ q[b, :, h], p.T @ do
            dpk[:, g] += dkeys[:Tn]
            dpv[:, g] += dvals[:Tn]
            dk[b, :, g] += dkeys[Tn:]
            dv[b, :, g] += dvals[Tn:]
        return dq, dk, dv, dpk, dpv

    return out, backward


@pytest.fixture(scope="module")
def inputs():
    r = np.random.default_rng(0)
    f = lambda *s: r.normal(size=s).astype(np.float32)  # noqa: E731
    valid = np.ones((B, S), bool)
    for b, n in enumerate(PADS):
        valid[b, :n] = False
    return dict(q=f(B, S, NH, HD) * 2, k=f(B, S, NKV, HD) * 2, v=f(B, S, NKV, HD), pk=f(T, NKV, HD) * 2,
                pv=f(T, NKV, HD), valid=valid, dout=f(B, S, NH, HD))


@pytest.mark.parametrize("with_prefix", [False, True], ids=["P1-no-prefix", "P4-prefix"])
@pytest.mark.parametrize("impl", IMPLS)
def test_outputs_and_gradients_match_float64(inputs, impl, with_prefix):
    x = inputs
    seg = jnp.asarray(x["valid"].astype(np.int32))

    def f(q, k, v, pk, pv):
        prefix = (pk, pv) if with_prefix else None
        if impl == "chunked":  # blocks of 4: several query and key blocks, masked ones skipped
            Bq, Sq = q.shape[:2]
            pos = jnp.arange(Sq, dtype=jnp.int32)
            kk, vv, kv_pos, kv_seg = k, v, pos, seg
            if prefix is not None:
                kk = jnp.concatenate([jnp.broadcast_to(pk, (Bq,) + pk.shape), k], 1)
                vv = jnp.concatenate([jnp.broadcast_to(pv, (Bq,) + pv.shape), v], 1)
                kv_pos = jnp.concatenate([jnp.full((T,), -1, jnp.int32), pos])
                kv_seg = jnp.concatenate([jnp.ones((Bq, T), jnp.int32), seg], 1)
            return A.chunked(q, kk, vv, pos, kv_pos, seg, kv_seg, HD ** -0.5, block=4)
        return A.self_attention(q, k, v, prefix, seg, impl)

    args = [jnp.asarray(x[n]) for n in ("q", "k", "v", "pk", "pv")]
    out, vjp = jax.vjp(f, *args)
    grads = vjp(jnp.asarray(x["dout"]))
    ref, backward = np_attention(x["q"], x["k"], x["v"], (x["pk"], x["pv"]) if with_prefix else None, x["valid"])
    ref_grads = backward(x["dout"].astype(np.float64))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)
    names = ["dq", "dk", "dv"] + (["dpk", "dpv"] if with_prefix else [])
    for name, g, r in zip(names, grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), r, atol=1e-5, rtol=1e-5, err_msg=name)
    assert np.abs(ref[1, PADS[1]:] - ref[0, PADS[1]:]).max() > 1e-2  # rows differ: padding matters
    if with_prefix:
        assert np.abs(ref_grads[3]).max() > 1e-2  # the prefix gets gradient


def test_chunked_skips_blocks_above_the_diagonal():
    pos = jnp.arange(12, dtype=jnp.int32).reshape(3, 4)
    need = np.asarray(A._needed(pos, pos))
    np.testing.assert_array_equal(need, np.tril(np.ones((3, 3), bool)))


def test_auto_and_unavailable_implementations():
    assert A.resolve("auto", "cpu") == "chunked"
    assert A.resolve("auto", "tpu") == "splash"
    assert A.resolve("auto", "gpu", jnp.bfloat16) == "cudnn"
    assert A.resolve("auto", "gpu", jnp.float32) == "chunked"  # cuDNN flash takes 16-bit inputs
    with pytest.raises(UserError, match="16-bit"):
        A.resolve("cudnn", "gpu", jnp.float32)
    for impl, platform in (("cudnn", "cpu"), ("splash", "cpu"), ("splash", "gpu")):
        with pytest.raises(UserError, match=f"attention_impl={impl} needs"):
            A.resolve(impl, platform)
    with pytest.raises(UserError, match="unknown"):
        A.resolve("flash", "cpu")


# ---- the whole model per implementation ----------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _model(P: int, impl: str):
    cfg = preset("tiny", parscale_n=P, parscale_n_tokens=5, vocab_size=97, attention_impl=impl)
    model = M.make_model(cfg)
    params = M.init_params(model, jax.random.PRNGKey(P))
    if P > 1:
        params["prefix"] = jax.tree.map(lambda a: a * 30.0, params["prefix"])
    return cfg, model, params


@pytest.mark.parametrize("impl,P", [(i, 4) for i in IMPLS + [A.CUDNN_XLA]] + [("chunked", 1)])
def test_model_with_left_padding_matches_float64(impl, P):
    cfg, model, params = _model(P, impl)
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, cfg.vocab_size))
    pad = 3
    padded = np.concatenate([np.zeros((2, pad), np.int32), tokens], 1)
    mask = np.concatenate([np.zeros((2, pad), bool), np.ones(tokens.shape, bool)], 1)
    mask[0, :pad] = True  # row 0 unpadded (its first tokens are real zeros)
    states = jax.jit(lambda p, t, m: model.apply({"params": p}, t, attention_mask=m, method=M.ParScaleLM.stream_states))
    z, _ = states(params, padded, mask)
    ref0 = np_stream_states(params, cfg, padded[:1])
    ref1 = np_stream_states(params, cfg, tokens[1:])
    np.testing.assert_allclose(np.asarray(z)[:, :1], ref0, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(z)[:, 1:, pad:], ref1, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_cached_decoding_equals_recomputation(impl):
    cfg, model, params = _model(4, impl)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 10), 0, cfg.vocab_size)
    mask = jnp.ones((2, 10), bool).at[1, :3].set(False)
    apply = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, attention_mask=m, cache=c))
    full, _ = jax.jit(lambda p, t, m: model.apply({"params": p}, t, attention_mask=m))(params, tokens, mask)
    cache = M.init_cache(model, params, 2, 10)
    logits, cache = apply(params, tokens[:, :6], mask[:, :6], cache)  # prefill
    steps = [logits]
    for t in range(6, 10):  # then one token at a time
        lg, cache = apply(params, tokens[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(lg)
    got = np.concatenate([np.asarray(s) for s in steps], 1)
    keep = np.asarray(mask)
    np.testing.assert_allclose(got[keep], np.asarray(full)[keep], atol=1e-5, rtol=1e-5)


def test_attention_impl_is_runtime_only():
    """Not in checkpoint metadata, Hugging Face exports or the resume check; no parameter."""
    a, b = preset("tiny", parscale_n=4), preset("tiny", parscale_n=4, attention_impl="xla")
    assert "attention_impl" not in a.to_dict() and a.to_dict() == b.to_dict()
    assert config_diff(a, b) == []
    assert "attention_impl" not in hf.hf_config_dict(b)
    shapes = [jax.tree.map(lambda x: (x.shape, x.dtype), M.abstract_params(M.make_model(c))) for c in (a, b)]
    assert shapes[0] == shapes[1]
