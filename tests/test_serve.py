"""Decoding as served: the weights cast once to the serving dtype against today's per-step cast
of float32 weights (the same tokens), the donated cache consumed without warnings, and the
decode mesh resolved from the device count against sizes worked out by hand."""
from __future__ import annotations

import functools
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parscale_jax import decode as D
from parscale_jax import model as M
from parscale_jax import sharding as S
from parscale_jax.config import preset
from parscale_jax.errors import UserError

PAD = 256
PROMPTS = [[5, 17, 33, 2, 90], [7, 8, 9, 10, 11, 12, 13, 14, 15], [300, 301]]


@functools.lru_cache(maxsize=None)
def _build(P: int):
    cfg = preset("tiny", parscale_n=P, max_position_embeddings=64, tie_word_embeddings=False)
    model = M.make_model(cfg, "bfloat16")
    params = M.init_params(model, jax.random.PRNGKey(P))
    params["backbone"]["lm_head"]["kernel"] = params["backbone"]["lm_head"]["kernel"] * 20.0
    if P > 1:
        params["prefix"] = jax.tree.map(lambda a: a * 30.0, params["prefix"])
        params["aggregator"] = jax.tree.map(lambda a: a * 25.0, params["aggregator"])
    return model, params


@pytest.mark.slow
@pytest.mark.parametrize("P", [4])
def test_weights_cast_once_give_the_per_step_cast_tokens(P):
    model, params = _build(P)
    per_step = D.Generator(model, params, eos_id=None, pad_id=PAD, chunk=4, serve_dtype="float32")
    once = D.Generator(model, params, eos_id=None, pad_id=PAD, chunk=4)  # auto: the compute dtype
    assert once.serve_dtype == "bfloat16" and per_step.serve_dtype == "float32"
    assert {a.dtype for a in jax.tree.leaves(once.params)} == {jnp.dtype(jnp.bfloat16)}
    assert {a.dtype for a in jax.tree.leaves(per_step.params)} == {jnp.dtype(jnp.float32)}
    a = per_step.generate(PROMPTS, 12, D.Sampling(temperature=0.8), seed=3)
    b = once.generate(PROMPTS, 12, D.Sampling(temperature=0.8), seed=3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # and not trivially: float16 weights (another rounding of the same values) change the logits
    f16 = D.serving_params(params, "float16")
    logits = lambda p: model.apply({"params": p}, jnp.asarray([PROMPTS[0]]))[0]  # noqa: E731
    assert not np.array_equal(np.asarray(logits(f16), np.float32), np.asarray(logits(params), np.float32))


def test_serving_params_casts_floats_only():
    tree = {"w": np.ones((2, 3), np.float32), "i": np.arange(3, dtype=np.int32)}
    out = D.serving_params(tree, "bfloat16")
    assert out["w"].dtype == jnp.bfloat16 and out["i"].dtype == np.int32
    assert D.serving_params(tree, "float32")["w"] is tree["w"]  # nothing copied
    assert D.serve_dtype_of("auto", jnp.float32) == "float32" and D.serve_dtype_of(None, jnp.bfloat16) == "bfloat16"
    with pytest.raises(UserError, match="serve-dtype 'int4'"):
        D.serve_dtype_of("int4", jnp.float32)


def test_prefill_and_chunks_consume_the_donated_state_without_warnings():
    model, params = _build(4)
    params = D.serving_params(params, "bfloat16")
    toks, mask = D.left_pad(PROMPTS, PAD)
    cache = M.init_cache(model, params, len(PROMPTS), toks.shape[1] + 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. jax's "Some donated buffers were not usable"
        logits, new = D.make_prefill(model)(params, cache, toks, mask)
        assert cache["k"].is_deleted() and cache["v"].is_deleted()  # updated in place
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        done = jnp.zeros(len(PROMPTS), bool)
        out, newer, tok2, done2 = D.make_decode_chunk(model, PAD, 2)(
            params, new, token, done, jax.random.PRNGKey(0), jnp.int32(1), D.Sampling().astuple(), jnp.int32(-1))
        assert new["k"].is_deleted() and token.is_deleted() and done.is_deleted()
    assert int(newer["index"]) == toks.shape[1] + 2 and out.shape == (len(PROMPTS), 2)


def _mesh(**kw):
    return types.SimpleNamespace(**{**S.DEFAULT_MESH, **kw})


def test_decode_mesh_shards_the_weights_by_default():
    # paper-1.6b: 16 heads, MLP 8320; 4 chips: tensor 4 (16 and 8320 divisible), nothing left
    assert S.decode_mesh_shape(_mesh(), 4, 16, 8320, 8) == {"data": 1, "fsdp": 1, "stream": 1, "tensor": 4}
    # 8 chips, 4 heads: tensor 4, the remaining 2 over the streams (P = 8)
    assert S.decode_mesh_shape(_mesh(), 8, 4, 160, 8) == {"data": 1, "fsdp": 1, "stream": 2, "tensor": 4}
    # 12 chips, 4 heads, P = 1: tensor 4, stream 1, data 3
    assert S.decode_mesh_shape(_mesh(), 12, 4, 160, 1) == {"data": 3, "fsdp": 1, "stream": 1, "tensor": 4}
    # 6 heads, MLP 10, 4 chips: tensor 2 (4 divides neither 6 nor 10), P = 2 takes the other 2
    assert S.decode_mesh_shape(_mesh(), 4, 6, 10, 2) == {"data": 1, "fsdp": 1, "stream": 2, "tensor": 2}
    # a mesh the config sets is kept
    assert S.decode_mesh_shape(_mesh(data=2, tensor=2), 4, 16, 8320, 8) == {"data": 2, "fsdp": 1, "stream": 1,
                                                                           "tensor": 2}
