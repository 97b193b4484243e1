"""The ParScale transformer: one Qwen2 decoder run on P streams, mixed by a softmax gate.

    x          = embed(tokens)                                  [B, S, H]
    h_p        = Decoder(x; prefix_p)        for p = 1..P       (jax.vmap over streams;
                                                                  backbone params broadcast)
    z_p        = RMSNorm(h_p)                                   per stream
    w          = softmax(W2 silu(W1 concat_(h,p)(z) + b1) + b2) over P, in float32
    w          = w (1 - eps) + eps / P                          (eps = parscale_attn_smooth)
    logits     = lm_head(sum_p w_p z_p)                         once

Inside the decoder each attention layer prepends the stream's own T prefix keys/values
(not rotated) to the keys/values of the real tokens; real tokens keep positions 0, 1, ...
P = 1 has no prefix and no aggregator: it is exactly Qwen2.

Params are one pytree with three groups: ``backbone`` (shared by all streams), ``prefix``
(``k``/``v`` of shape [L, P, nKV, T, hd]) and ``aggregator`` (the gate). Layers are stacked
on a leading ``layers`` axis (``nn.scan``). Every param and activation carries logical axis
names (params the short ones such as ``embed``, activations ``activation_*``) so a mesh is
mapped onto them by rules (``sharding.py``). Attention (:mod:`parscale_jax.attention`) never
forms the [S, T + S] score matrix unless ``attention_impl=xla``.

The KV cache for decoding is an explicit pytree (see :func:`init_cache`): per stream and
layer the T prefix entries come first, then the tokens.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from parscale_jax import attention as A
from parscale_jax.config import ModelConfig

Array = jax.Array

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(d: Any) -> Any:
    return _DTYPES[d] if isinstance(d, str) else d


class _Logical(nn.LogicallyPartitioned):
    """A param's logical axis names. The sharding constraint applies once the value has its
    final rank: DenseGeneral initialises a multi-dimensional kernel flat and unboxes it before
    the reshape (under ``jax.set_mesh`` the flat value would fail the constraint)."""

    def unbox(self, apply_constraint=True):
        return super().unbox(apply_constraint and len(self.names) == jnp.ndim(self.value))


def _logical(init, names: tuple[str, ...]):
    return lambda *args, **kwargs: _Logical(init(*args, **kwargs), names)


def _init(std: float, names: tuple[str, ...]):
    return _logical(nn.initializers.normal(std), names)


def _zeros(names: tuple[str, ...]):
    return _logical(nn.initializers.zeros_init(), names)


def _constrain(x: Array, names: tuple[str, ...]) -> Array:
    """Logical sharding constraint; skipped for activations in the rows layout (no mesh)."""
    return nn.with_logical_constraint(x, names) if x.ndim == len(names) else x


# ---- building blocks ---------------------------------------------------------------------
# Logical names of the activations in their [P, B, S, ...] layout (P = streams).
_ACT = ("activation_stream", "activation_batch", "activation_length")


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) in float32, cast back to x's dtype, times the weight."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", _logical(nn.initializers.ones_init(), ("embed",)),
                           (x.shape[-1],), jnp.float32)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype).astype(self.dtype) * scale.astype(self.dtype)


def rotary(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding, "rotate half" convention. x [..., B, S, N, hd], positions [B, S]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))  # [hd/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, S, 1, hd]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : hd // 2], xf[..., hd // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def rows_layout() -> bool:
    """Whether the decoder carries its activations as one [P*B*S, H] matrix (streams, batch and
    sequence merged into rows): whenever no mesh of several devices is active. The dense layers
    then see 2-D inputs, and their weight gradients are plain [rows, in]^T [rows, out] products
    (on XLA:CPU a dot contracting several dims runs through a transposed copy of its operand).
    On a mesh the activations keep their [P, B, S, H] layout and logical axis names: merging a
    sharded batch dim with the stream dim into rows is not a tiling GSPMD can express."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or math.prod(mesh.shape.values()) == 1


class Attention(nn.Module):
    """Grouped-query attention with per-stream prefix keys/values and an optional KV cache.

    ``x``: [P*B*S, H] rows or [P, B, S, H] (see :func:`rows_layout`); returns the same layout.
    ``prefix_kv``: this layer's (k, v) [P, nKV, T, hd] or None. ``cache``: the whole cache (k, v)
    [P, L, B, T + max_len, nKV x r, hd] (r: init_cache's kv_repeat) or None; this call's
    keys/values are written into layer ``layer``'s slots in place and the updated cache is returned.
    """

    cfg: ModelConfig
    dtype: Any
    stream_axis: str | None = None

    @nn.compact
    def __call__(self, x, ctx, prefix_kv, cache, layer):
        cfg, hd = self.cfg, self.cfg.hd
        nH, nKV, std = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.initializer_range
        P, (B, S) = cfg.parscale_n, ctx["positions"].shape
        dense = functools.partial(nn.DenseGeneral, dtype=self.dtype, param_dtype=jnp.float32)
        q = dense((nH, hd), use_bias=True, name="q", kernel_init=_init(std, ("embed", "heads", "head_dim")),
                  bias_init=_zeros(("heads", "head_dim")))(x)
        k = dense((nKV, hd), use_bias=True, name="k", kernel_init=_init(std, ("embed", "kv_heads", "head_dim")),
                  bias_init=_zeros(("kv_heads", "head_dim")))(x)
        v = dense((nKV, hd), use_bias=True, name="v", kernel_init=_init(std, ("embed", "kv_heads", "head_dim")),
                  bias_init=_zeros(("kv_heads", "head_dim")))(x)
        q, k, v = (a.reshape((P, B, S) + a.shape[-2:]) for a in (q, k, v))
        heads = _ACT + ("activation_heads", "activation_head_dim")
        kv_names = _ACT + ("activation_kv_heads", "activation_head_dim")
        q = _constrain(rotary(q, ctx["positions"], cfg.rope_theta), heads)
        k = _constrain(rotary(k, ctx["positions"], cfg.rope_theta), kv_names)
        v = _constrain(v, kv_names)
        impl = cfg.attention_impl
        if cache is None:
            prefix = None  # [P, nKV, T, hd] -> [P, T, nKV, hd], not rotated
            if prefix_kv is not None:
                prefix = tuple(jnp.swapaxes(a, 1, 2).astype(self.dtype) for a in prefix_kv)
            attend = lambda q, k, v, pre: A.self_attention(q, k, v, pre, ctx["segments"], impl)  # noqa: E731
            out = jax.vmap(attend, spmd_axis_name=self.stream_axis)(q, k, v, prefix)
        else:
            # Cache slots: [T prefix entries | tokens]; this call's tokens go after the
            # `cache_index` tokens already there. The prefix entries were written by init_cache.
            if cache[0].shape[-2] != nKV:  # a cache of repeated KV heads (init_cache's kv_repeat)
                r = cache[0].shape[-2] // nKV
                k, v = (_constrain(jnp.repeat(a, r, axis=-2), kv_names) for a in (k, v))
            start = (0, layer, 0, cfg.prefix_len + ctx["cache_index"], 0, 0)
            cache = tuple(jax.lax.dynamic_update_slice(c, a[:, None].astype(c.dtype), start) for c, a in zip(cache, (k, v)))
            ck, cv = (jax.lax.dynamic_index_in_dim(c, layer, axis=1, keepdims=False).astype(self.dtype) for c in cache)
            attend = lambda q, k, v: A.masked_attention(q, k, v, ctx["q_pos"], ctx["kv_pos"], ctx["segments"],  # noqa: E731
                                                        ctx["kv_segments"], impl)
            out = jax.vmap(attend, spmd_axis_name=self.stream_axis)(q, ck, cv)
        out = _constrain(out, heads)
        if x.ndim == 2:
            out = out.reshape(P * B * S, nH, hd)
        out = dense(cfg.hidden_size, axis=(-2, -1), use_bias=False, name="o",
                    kernel_init=_init(std, ("heads", "head_dim", "embed")))(out)
        return out, cache


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    cfg: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, x):
        cfg, std = self.cfg, self.cfg.initializer_range
        dense = functools.partial(nn.DenseGeneral, dtype=self.dtype, param_dtype=jnp.float32, use_bias=False)
        gate = dense(cfg.intermediate_size, name="gate", kernel_init=_init(std, ("embed", "mlp")))(x)
        up = dense(cfg.intermediate_size, name="up", kernel_init=_init(std, ("embed", "mlp")))(x)
        h = _constrain(nn.silu(gate) * up, _ACT + ("activation_mlp",))
        return dense(cfg.hidden_size, name="down", kernel_init=_init(std, ("mlp", "embed")))(h)


class DecoderLayer(nn.Module):
    """x = x + Attn(RMSNorm(x)); x = x + MLP(RMSNorm(x)). Scanned over layers:
    ((x, cache), (prefix, layer index)) -> ((x, cache), None)."""

    cfg: ModelConfig
    dtype: Any
    stream_axis: str | None = None

    @nn.compact
    def __call__(self, carry, layer_in, ctx):
        cfg = self.cfg
        x, cache = carry
        prefix, layer = layer_in
        attn_out, cache = Attention(cfg, self.dtype, self.stream_axis, name="attn")(
            RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_norm")(x), ctx, prefix, cache, layer)
        x = x + attn_out
        x = x + MLP(cfg, self.dtype, name="mlp")(RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attn_norm")(x))
        return (_constrain(x, _ACT + ("activation_embed",)), cache), None


def layer_params(decoder_params: dict, n_layers: int) -> list[dict]:
    """The decoder's params as one tree per layer: split from the stacked ``layers`` [L, ...]
    (one ``lax.split`` per leaf; its gradient is one concatenate), or the ``layers_{i}`` trees
    of :func:`unstack_layers`."""
    if "layers" not in decoder_params:
        return [decoder_params[f"layers_{i}"] for i in range(n_layers)]
    leaves, tree = jax.tree.flatten(decoder_params["layers"])
    parts = [jnp.split(a, n_layers, axis=0) for a in leaves]
    return [jax.tree.unflatten(tree, [p[i][0] for p in parts]) for i in range(n_layers)]


class Decoder(nn.Module):
    """All L layers over all streams. Params are stacked on a leading ``layers`` axis (nn.scan).

    ``scan_layers``: one ``lax.scan`` over the stacked params (compile time flat in depth).
    Otherwise a Python loop over per-layer params (:func:`layer_params`): each layer's weights
    are their own buffers, so no layer reads its weights through a dynamic slice (XLA:CPU
    copies such a slice before a matmul) and no residual is written into a stacked buffer.
    """

    cfg: ModelConfig
    dtype: Any
    remat: str = "none"
    scan_layers: bool = True
    stream_axis: str | None = None

    @nn.compact
    def __call__(self, x, prefix, cache, ctx):
        cfg, L = self.cfg, self.cfg.num_hidden_layers
        layer_cls = DecoderLayer
        if self.remat != "none":
            layer_cls = nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        if self.scan_layers or self.is_initializing():
            stack = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(0, nn.broadcast), length=L, metadata_params={nn.PARTITION_NAME: "layers"})
            (x, cache), _ = stack(cfg, self.dtype, self.stream_axis, name="layers")(
                (x, cache), (prefix, jnp.arange(L)), ctx)
            return x, cache
        layer = layer_cls(cfg, self.dtype, self.stream_axis, parent=None)
        for i, p in enumerate(layer_params(self.variables["params"], L)):
            pre = None if prefix is None else tuple(a[i] for a in prefix)
            (x, cache), _ = layer.apply({"params": p}, (x, cache), (pre, i), ctx)
        return x, cache


class Backbone(nn.Module):
    """Embedding, the shared decoder over all streams, the final norm and the LM head."""

    cfg: ModelConfig
    dtype: Any
    remat: str = "none"
    scan_layers: bool = True
    stream_mesh_axis: str | None = None

    def setup(self):
        cfg = self.cfg
        self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                              embedding_init=_init(cfg.initializer_range, ("vocab", "embed")))
        self.decoder = Decoder(cfg, self.dtype, self.remat, self.scan_layers, self.stream_mesh_axis)
        self.final_norm = RMSNorm(cfg.rms_norm_eps, self.dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.DenseGeneral(cfg.vocab_size, use_bias=False, dtype=self.dtype,
                                           param_dtype=jnp.float32,
                                           kernel_init=_init(cfg.initializer_range, ("embed", "vocab")))

    def __call__(self, tokens, prefix, cache, ctx):
        """Per-stream normed final states [P, B, S, H] and the updated cache (or None)."""
        # The lookup's output is sharded like the table (embed over fsdp); split the batch over
        # data first, then trade embed for batch over fsdp (one all-to-all): resharding in one
        # step makes XLA replicate the whole tensor on a data x fsdp x tensor mesh.
        x = _constrain(self.embed(tokens), ("activation_batch_data", "activation_length", "embed"))
        x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        # Every stream starts from the same embedded tokens; the backbone's params are shared.
        x = _constrain(jnp.broadcast_to(x, (self.cfg.parscale_n,) + x.shape), _ACT + ("activation_embed",))
        if rows_layout():
            x = x.reshape(-1, x.shape[-1])
        h, cache = self.decoder(x, prefix, cache, ctx)
        h = _constrain(h.reshape((self.cfg.parscale_n,) + tokens.shape + h.shape[-1:]), _ACT + ("activation_embed",))
        return self.final_norm(h), cache

    def logits(self, h):
        if self.cfg.tie_word_embeddings:
            out = self.embed.attend(h)
        else:
            out = self.lm_head(h)
        return _constrain(out, ("activation_batch", "activation_length", "activation_vocab"))


class Prefix(nn.Module):
    """Per-layer, per-stream prefix keys and values, [L, P, nKV, T, hd] each (never left empty)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self):
        cfg = self.cfg
        shape = (cfg.num_hidden_layers, cfg.parscale_n, cfg.num_key_value_heads, cfg.parscale_n_tokens, cfg.hd)
        names = ("layers", "stream", "kv_heads", "prefix", "head_dim")
        k = self.param("k", _init(cfg.initializer_range, names), shape, jnp.float32)
        v = self.param("v", _init(cfg.initializer_range, names), shape, jnp.float32)
        return k, v


class Aggregator(nn.Module):
    """The softmax gate over streams. z: [P, B, S, H] -> mixed [B, S, H], weights [B, S, P]."""

    cfg: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, z):
        cfg = self.cfg
        P, B, S, H = z.shape
        # Concatenate in the authors' (h, p) order: feature index h * P + p.
        cat = jnp.transpose(z, (1, 2, 3, 0)).reshape(B, S, H * P)
        std = cfg.initializer_range
        g = nn.DenseGeneral(H, use_bias=True, dtype=self.dtype, param_dtype=jnp.float32, name="gate_in",
                            kernel_init=_init(std, ("stream_embed", "embed")), bias_init=_zeros(("embed",)))(cat)
        # Small random output layer: the first gate is near uniform (and every weight gets a gradient).
        g = nn.DenseGeneral(P, use_bias=True, dtype=self.dtype, param_dtype=jnp.float32, name="gate_out",
                            kernel_init=_init(std, ("embed", "stream")), bias_init=_zeros(("stream",)))(nn.silu(g))
        w = jax.nn.softmax(g.astype(jnp.float32), axis=-1)
        eps = cfg.parscale_attn_smooth
        w = w * (1.0 - eps) + eps / P
        mixed = jnp.einsum("pbsh,bsp->bsh", z.astype(jnp.float32), w)
        return mixed.astype(self.dtype), w


class ParScaleLM(nn.Module):
    """The whole model. ``apply({'params': params}, tokens, attention_mask=None, cache=None)``.

    Returns ``(logits [B, S, V] in the compute dtype, new_cache or None)``.
    """

    cfg: ModelConfig
    dtype: Any = jnp.float32
    remat: str = "none"
    scan_layers: bool = True
    stream_mesh_axis: str | None = None

    def setup(self):
        self.backbone = Backbone(self.cfg, self.dtype, self.remat, self.scan_layers, self.stream_mesh_axis)
        if self.cfg.parscale_n > 1:
            self.prefix = Prefix(self.cfg)
            self.aggregator = Aggregator(self.cfg, self.dtype)

    def stream_states(self, tokens, attention_mask=None, cache=None):
        """Per-stream normed final hidden states [P, B, S, H] (before aggregation), new cache."""
        cfg = self.cfg
        B, S = tokens.shape
        valid = jnp.ones((B, S), bool) if attention_mask is None else attention_mask.astype(bool)
        # Segments: 1 real token, 0 padding (see parscale_jax.attention); None: no padding.
        segments = None if attention_mask is None else valid.astype(jnp.int32)
        T = cfg.prefix_len
        new_valid = None
        if cache is None:
            # Real tokens keep positions 0, 1, ... counting real tokens only (left padding).
            positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
            ctx = {"positions": positions, "segments": segments}
        else:
            cache_index = cache["index"]
            seen = jnp.sum(cache["valid"][:, T:], axis=1)  # real tokens already in the cache
            positions = seen[:, None] + jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
            new_valid = jax.lax.dynamic_update_slice(cache["valid"], valid, (0, T + cache_index))
            slots = jnp.arange(new_valid.shape[1], dtype=jnp.int32) - T  # token index of each slot
            kv_seg = jnp.where(slots[None, :] < 0, 1, new_valid.astype(jnp.int32))  # prefix: real
            ctx = {"positions": positions, "segments": valid.astype(jnp.int32), "cache_index": cache_index,
                   "q_pos": cache_index + jnp.arange(S, dtype=jnp.int32), "kv_pos": slots, "kv_segments": kv_seg}
        prefix = self.prefix() if cfg.parscale_n > 1 and cache is None else None  # [L, P, nKV, T, hd]
        kv = (cache["k"], cache["v"]) if cache is not None else None
        z, kv = self.backbone(tokens, prefix, kv, ctx)
        new_cache = None
        if cache is not None:
            new_cache = {"k": kv[0], "v": kv[1], "valid": new_valid, "index": cache_index + S}
        return z, new_cache

    def aggregate(self, z):
        """Mix the P streams: (mixed [B, S, H], gate weights [B, S, P]); identity for P=1."""
        if self.cfg.parscale_n == 1:
            return z[0], jnp.ones(z.shape[1:3] + (1,), jnp.float32)
        return self.aggregator(z)

    def hidden(self, tokens, attention_mask=None, cache=None):
        """The mixed final state [B, S, H] (the LM head's input), new cache."""
        z, new_cache = self.stream_states(tokens, attention_mask, cache)
        h, _ = self.aggregate(z)
        return _constrain(h, ("activation_batch", "activation_length", "activation_embed")), new_cache

    def __call__(self, tokens, attention_mask=None, cache=None):
        h, new_cache = self.hidden(tokens, attention_mask, cache)
        return self.backbone.logits(h), new_cache


# ---- functional API ----------------------------------------------------------------------
def make_model(cfg: ModelConfig, dtype: Any = "float32", remat: str = "none", scan_layers: bool = True,
               stream_mesh_axis: str | None = None, platform: str | None = None) -> ParScaleLM:
    """Build the module. ``dtype`` is the compute dtype (params stay float32).

    ``scan_layers=False`` loops over the layers in Python (same param layout, longer compiles;
    each layer's weights are their own buffers: see :class:`Decoder`).
    ``remat``: "none", "full" (recompute each layer in the backward pass) or "save_dots".
    ``cfg.attention_impl`` is resolved for ``platform`` (default: jax's default backend; the
    AOT compiler passes the target's), so the module holds a concrete implementation.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: choose one of {sorted(REMAT_POLICIES)}")
    cfg = cfg.replace(attention_impl=A.resolve(cfg.attention_impl, platform, _dtype(dtype), cfg.hd))
    return ParScaleLM(cfg, _dtype(dtype), remat, bool(scan_layers), stream_mesh_axis)


def _boxed_init(model: ParScaleLM, rng: Array):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return model.init(rng, tokens)["params"]


def init_params(model: ParScaleLM, rng: Array) -> dict:
    """Fresh params: {'backbone', 'prefix', 'aggregator'} (the last two only for P > 1).
    Compiled as one program (eager init would dispatch every op of the scanned layers)."""
    return nn.meta.unbox(jax.jit(lambda r: _boxed_init(model, r))(rng))


def abstract_params(model: ParScaleLM) -> dict:
    """Shapes/dtypes of the params (jax.ShapeDtypeStruct), without allocating them."""
    return nn.meta.unbox(jax.eval_shape(lambda r: _boxed_init(model, r), jax.random.PRNGKey(0)))


def logical_axes(model: ParScaleLM) -> dict:
    """The params' logical axis names as a pytree of PartitionSpec (same structure as params)."""
    boxed = jax.eval_shape(lambda r: _boxed_init(model, r), jax.random.PRNGKey(0))
    return nn.get_partition_spec(boxed)


def unstack_layers(params: dict) -> dict:
    """The same params with the decoder's stacked ``layers`` [L, ...] replaced by one tree per
    layer, ``layers_0`` ... ``layers_{L-1}``: each layer's weights in their own buffers, for a
    model with ``scan_layers=False`` (the decoding layout on CPU, see
    :func:`parscale_jax.decode.decoding_layout`). Stacked stays the checkpoint format."""
    dec = params["backbone"]["decoder"]
    if "layers" not in dec:
        return params
    L = jax.tree.leaves(dec["layers"])[0].shape[0]
    per_layer = jax.jit(functools.partial(layer_params, n_layers=L))(dec)
    backbone = {**params["backbone"], "decoder": {f"layers_{i}": p for i, p in enumerate(per_layer)}}
    return {**params, "backbone": backbone}


def lm_head_kernel(cfg: ModelConfig, params: dict) -> Array:
    """The LM head as an [H, V] matrix (the embedding, transposed, when tied)."""
    bb = params["backbone"]
    return bb["embed"]["embedding"].T if cfg.tie_word_embeddings else bb["lm_head"]["kernel"]


def count_params(params: Any, non_embedding: bool = False) -> int:
    """Number of parameters; ``non_embedding`` drops the token embedding and the LM head."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(k, "key", None) for k in path]
        if non_embedding and ("embed" in keys or "lm_head" in keys):
            continue
        total += int(leaf.size)
    return total


def init_cache(model: ParScaleLM, params: dict, batch_size: int, max_len: int, dtype: Any = None,
               kv_repeat: int = 1) -> dict:
    """An empty KV cache for ``max_len`` tokens. Per stream and layer: T prefix slots, then tokens.

    ``{'k', 'v'}: [P, L, B, T + max_len, nKV * kv_repeat, hd]``, ``'valid': [B, T + max_len]``
    (which slots hold real tokens; the prefix slots are False), ``'index'``: tokens written so far.
    ``kv_repeat`` > 1 stores each KV head ``kv_repeat`` times in a row (head j at j*r .. j*r + r-1,
    so query head h still reads its group's head): a cache whose heads split evenly over a tensor
    axis larger than nKV (:func:`sharding.cache_kv_repeat`); the attention is unchanged.
    """
    cfg = model.cfg
    dtype = model.dtype if dtype is None else _dtype(dtype)
    T = cfg.prefix_len
    r = int(kv_repeat)
    shape = (cfg.parscale_n, cfg.num_hidden_layers, batch_size, T + max_len, cfg.num_key_value_heads * r, cfg.hd)
    k = jnp.zeros(shape, dtype)
    v = jnp.zeros(shape, dtype)
    if T:
        # prefix [L, P, nKV, T, hd] -> [P, L, 1, T, nKV, hd] into slots [0, T)
        pk = jnp.transpose(params["prefix"]["k"], (1, 0, 3, 2, 4))[:, :, None].astype(dtype)
        pv = jnp.transpose(params["prefix"]["v"], (1, 0, 3, 2, 4))[:, :, None].astype(dtype)
        if r > 1:
            pk, pv = jnp.repeat(pk, r, axis=-2), jnp.repeat(pv, r, axis=-2)
        k = k.at[:, :, :, :T].set(jnp.broadcast_to(pk, shape[:3] + pk.shape[3:]))
        v = v.at[:, :, :, :T].set(jnp.broadcast_to(pv, shape[:3] + pv.shape[3:]))
    return {"k": k, "v": v, "valid": jnp.zeros((batch_size, T + max_len), bool),
            "index": jnp.zeros((), jnp.int32)}
