"""The chunked LM-head loss (no [B, S, V] logits) against the full-logits cross-entropy written
here: the same loss and gradients within 1e-6 relative in float32, and against float64 NumPy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parscale_jax import loss as L
from parscale_jax import model as M
from parscale_jax.config import preset


def full_logits_nll(h, w, targets):
    """Cross-entropy of the whole [B, S, V] logits, written out: log-sum-exp minus the target's."""
    logits = jnp.einsum("bsh,hv->bsv", h, w)
    m = jnp.max(logits, axis=-1, keepdims=True)
    logz = jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1)) + m[..., 0]
    return logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("chunk", [4, 5, 64])  # several chunks, a ragged last chunk, one chunk
def test_chunked_head_loss_equals_full_logits(chunk):
    r = np.random.default_rng(0)
    B, S, H, V = 2, 13, 16, 50
    h = jnp.asarray(r.normal(size=(B, S, H)), jnp.float32)
    w = jnp.asarray(r.normal(size=(H, V)) * 0.5, jnp.float32)
    t = jnp.asarray(r.integers(0, V, size=(B, S)), jnp.int32)
    cot = jnp.asarray(r.normal(size=(B, S)), jnp.float32)  # a non-uniform weighting of positions

    def got(h, w):
        return jnp.sum(L.head_nll(h, w, t, jnp.float32, chunk=chunk) * cot)

    def want(h, w):
        return jnp.sum(full_logits_nll(h, w, t) * cot)

    np.testing.assert_allclose(L.head_nll(h, w, t, jnp.float32, chunk=chunk), full_logits_nll(h, w, t), rtol=1e-6)
    g, wg = jax.grad(got, argnums=(0, 1))(h, w), jax.grad(want, argnums=(0, 1))(h, w)
    assert rel(g[0], wg[0]) < 1e-6 and rel(g[1], wg[1]) < 1e-6
    # float64 NumPy: the loss itself
    logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    ref = np.log(np.exp(logits).sum(-1)) - np.take_along_axis(logits, np.asarray(t)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(L.head_nll(h, w, t, jnp.float32, chunk=chunk)), ref, rtol=1e-5)


def test_sequence_nll_equals_full_logits_loss_of_the_model():
    """The train step's loss (model.hidden + chunked head) vs the model's full logits and the
    cross-entropy written here: the loss and the whole gradient within 1e-6 relative (each
    parameter's within 1e-5: tiny leaves such as the gate biases feel summation order)."""
    cfg = preset("tiny", parscale_n=2, parscale_n_tokens=3, vocab_size=97)  # tied head
    model = M.make_model(cfg)
    params = M.init_params(model, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)

    def chunked(p):
        return jnp.mean(L.sequence_nll(model, p, tokens))

    def full(p):
        logits, _ = model.apply({"params": p}, tokens[:, :-1])
        lz = jax.nn.logsumexp(logits, axis=-1)
        return jnp.mean(lz - jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0])

    (a, ga), (b, gb) = jax.jit(jax.value_and_grad(chunked))(params), jax.jit(jax.value_and_grad(full))(params)
    assert abs(float(a) - float(b)) <= 1e-6 * abs(float(b))
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gb)
    assert rel(np.concatenate([np.ravel(x) for _, x in flat_a]), np.concatenate([np.ravel(y) for y in flat_b])) < 1e-6
    for (path, x), y in zip(flat_a, flat_b):
        assert rel(x, y) < 1e-5, jax.tree_util.keystr(path)
