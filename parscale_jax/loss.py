"""Next-token cross-entropy, the one loss used by training and evaluation.

:func:`sequence_nll` is what the train step and the held-out evaluation call. Its
:func:`head_nll` computes the LM head and the
cross-entropy in chunks of the sequence (``lax.scan`` over a rematerialised body), so the
float32 [B, S, V] logits, their log-softmax and their gradient never exist at once: one
chunk's [B, chunk, V] does. :func:`token_nll` is the same loss on given logits.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from parscale_jax import model as M

CHUNK = 512  # tokens of the sequence per chunk of logits


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position negative log-likelihood in float32: logits [..., V], targets [...] -> [...]."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return logz - picked


def head_nll(h: jax.Array, head: jax.Array, targets: jax.Array, dtype: Any, chunk: int = CHUNK) -> jax.Array:
    """Per-position NLL [B, S] (float32) of ``logits = h @ head`` without forming all the logits.

    h [B, S, H] (the mixed final state), head [H, V] (float32 params), targets [B, S]. The
    matmul runs in the compute ``dtype`` with float32 accumulation; each chunk's logits are
    constrained to (batch, -, vocab) sharding.
    """
    B, S, H = h.shape
    c = min(chunk, S)
    n = -(-S // c)
    pad = n * c - S
    w = head.astype(dtype)
    hs = jnp.pad(h.astype(dtype), ((0, 0), (0, pad), (0, 0))).reshape(B, n, c, H).swapaxes(0, 1)
    ts = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad))).reshape(B, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def one(hc, tc):
        logits = jnp.einsum("bch,hv->bcv", hc, w, preferred_element_type=jnp.float32)
        logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
        return token_nll(logits, tc)

    _, nll = jax.lax.scan(lambda carry, xs: (carry, one(*xs)), None, (hs, ts))
    return nll.swapaxes(0, 1).reshape(B, n * c)[:, :S]


def sequence_nll(model: M.ParScaleLM, params: dict, tokens: jax.Array) -> jax.Array:
    """Next-token NLL [B, S-1] of token windows [B, S] (inputs w[:, :-1], targets w[:, 1:])."""
    h, _ = model.apply({"params": params}, tokens[:, :-1], method=M.ParScaleLM.hidden)
    return head_nll(h, M.lm_head_kernel(model.cfg, params), tokens[:, 1:], model.dtype)
