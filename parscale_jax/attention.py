"""Causal attention over [prefix | tokens] that never holds the [S, T + S] score matrix.

Which key a query sees is one rule, the same for every implementation::

    query i of row b sees key j   iff   kv_pos[j] <= q_pos[i]   and   kv_seg[b, j] == q_seg[b, i]

Positions order the keys (token index, or cache slot minus T); segments are 1 for real tokens
and 0 for (left) padding. The T prefix keys of a stream come first, at position -1, in the real
tokens' segment: every real query sees all of them plus the real tokens up to itself. A padded
query sees the padding up to itself (never an empty row); nothing of it reaches a real token.

``model.attention_impl`` picks the implementation (``auto``: per platform):

* ``xla``: the reference, today's path: the boolean mask and ``jax.nn.dot_product_attention``
  (O(S^2) memory).
* ``chunked``: blockwise online softmax in pure JAX with a hand-written (flash-attention style)
  backward that recomputes the probabilities block by block: O(S x block) memory, fully
  masked blocks skipped. The CPU default and the portable fallback; also the KV-cache path of
  every implementation but ``xla``.
* ``splash``: the Pallas TPU splash kernel inside ``jax.shard_map`` (batch over data x fsdp,
  heads over tensor). The prefix is one extra block of keys in front of the tokens, seen
  through a causal mask shifted by that block (``CausalMask(offset=Tp)``); its unused slots
  and the left padding are separated by segment ids.
* ``cudnn``: cuDNN flash attention (``jax.nn.dot_product_attention(implementation="cudnn",
  is_causal=True)``) inside ``jax.shard_map`` like splash, so each GPU's fused call holds only
  its own rows. The prefix enters as T extra keys in front with T dummy queries in front, so
  the plain causal mask of length T + S is exactly "all prefix keys, then causal"; left
  padding is rolled to the right and passed as sequence lengths. The one difference from the
  rule: a padded query's output is zero (cuDNN masks padded queries out), not the attention
  over the padding before it; nothing of a padded row reaches a real token either way.
  cuDNN flash takes 16-bit inputs, head_dim a multiple of 8 up to 128 (compute capability
  8.x) or 256 (9.0 and later); :func:`resolve` checks them.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import sys

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as Pspec

from parscale_jax import sharding as S
from parscale_jax.config import ATTENTION_IMPLS as IMPLS
from parscale_jax.errors import UserError

Array = jax.Array

# splash run by the Pallas interpreter (any platform, slow): for exactness tests on the CPU.
SPLASH_INTERPRET = "splash_interpret"
# the cudnn path (shard_map, prefix, padding) with JAX's XLA implementation of the same cuDNN call
# (causal mask plus sequence lengths): for exactness tests of that path on the CPU.
CUDNN_XLA = "cudnn_xla"
_AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}
BLOCK = 512          # chunked: query/key block (tokens)
SPLASH_BLOCK = 128   # splash: the kernel's default block; sequences are padded to it


def resolve(impl: str, platform: str | None = None, dtype=None, head_dim: int | None = None,
            capability: tuple[int, int] | None = None) -> str:
    """The implementation to run on ``platform`` (default: jax's default backend) with compute
    ``dtype`` and ``head_dim``. cuDNN flash attention needs 16-bit inputs and a head_dim that is
    a multiple of 8, at most 128 below compute capability 9.0 and 256 from Hopper on
    (``capability``: given, else the one :func:`gpu_target` sets for a deviceless compile, else
    the local GPU's): ``auto`` falls back to ``chunked`` and says so on stderr; an explicit
    ``cudnn`` is a one-line error."""
    platform = (platform or jax.default_backend()).lower()
    if impl == "auto":
        got = _AUTO.get(platform, "chunked")
        why = _cudnn_unfit(dtype, head_dim, capability) if got == "cudnn" else None
        if why and not (dtype is not None and jnp.dtype(dtype).itemsize != 2):  # float32: chunked, silently
            print(f"attention: auto picks chunked, not cudnn: {why}", file=sys.stderr)
        return "chunked" if why else got
    if impl in (SPLASH_INTERPRET, CUDNN_XLA):
        return impl
    if impl not in IMPLS:
        raise UserError(f"model.attention_impl={impl!r} is unknown: choose one of {', '.join(IMPLS)}")
    if impl == "splash" and platform != "tpu":
        raise UserError(f"model.attention_impl=splash needs TPU devices (these are {platform}): "
                        f"use auto or chunked")
    if impl == "cudnn" and platform not in ("gpu", "cuda"):
        raise UserError(f"model.attention_impl=cudnn needs NVIDIA GPU devices (these are {platform}): "
                        f"use auto or chunked")
    why = _cudnn_unfit(dtype, head_dim, capability) if impl == "cudnn" else None
    if why:
        raise UserError(f"model.attention_impl=cudnn: {why}: use auto or chunked"
                        + (", or set dtype=bfloat16" if "16-bit" in why else ""))
    return impl


def _capability(capability=None) -> tuple[int, int] | None:
    """Compute capability: given, else the deviceless target's, else the local GPU's, else None."""
    if capability is not None:
        return tuple(capability)
    if _TARGET_CC.get() is not None:
        return _TARGET_CC.get()
    try:
        d = jax.devices()[0]
        return tuple(int(x) for x in d.compute_capability.split(".")[:2]) if d.platform == "gpu" else None
    except (RuntimeError, AttributeError, ValueError):
        return None


def _cudnn_unfit(dtype, head_dim, capability) -> str | None:
    """Why cuDNN flash attention cannot take these inputs (None: it can)."""
    if dtype is not None and jnp.dtype(dtype).itemsize != 2:
        return f"cuDNN flash attention needs a 16-bit compute dtype (not {jnp.dtype(dtype).name})"
    cc = _capability(capability)
    if cc is not None and cc < (8, 0):
        return f"cuDNN flash attention needs compute capability 8.0 or later (this GPU: {cc[0]}.{cc[1]})"
    limit = 256 if cc is None or cc >= (9, 0) else 128
    if head_dim is not None and (head_dim % 8 or head_dim > limit):
        on = "" if cc is None else f" on compute capability {cc[0]}.{cc[1]}"
        return f"head_dim {head_dim} is not a multiple of 8 up to {limit}, as cuDNN flash attention needs{on}"
    return None


_TARGET_CC: contextvars.ContextVar = contextvars.ContextVar("parscale_gpu_target_cc", default=None)


@contextlib.contextmanager
def gpu_target(capability: tuple[int, int]):
    """Compile for a GPU of ``capability`` (e.g. (9, 0)) from a host without one (``aot``):
    :func:`resolve` checks against it, and JAX's own cuDNN checks, which otherwise ask the local
    (CPU) backend and so allow head_dim 128 at most, see it too while the context is open."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    cc = tuple(capability)
    token = _TARGET_CC.set(cc)
    saved = fa.check_compute_capability, fa.is_cuda_compute_capability_equal
    fa.check_compute_capability = lambda c: cc >= tuple(int(x) for x in c.split("."))
    fa.is_cuda_compute_capability_equal = lambda c: cc == tuple(int(x) for x in c.split("."))
    try:
        yield cc
    finally:
        fa.check_compute_capability, fa.is_cuda_compute_capability_equal = saved
        _TARGET_CC.reset(token)


# ---- entry points used by the model -------------------------------------------------------
def self_attention(q: Array, k: Array, v: Array, prefix: tuple[Array, Array] | None,
                   segments: Array | None, impl: str) -> Array:
    """Attention of S tokens over [prefix | tokens] (training, evaluation, prefill without cache).

    q [B, S, nH, hd], k/v [B, S, nKV, hd]; prefix (k, v) [T, nKV, hd] (not rotated) or None;
    segments [B, S] (1 real, 0 padding) or None (all real). Returns [B, S, nH, hd].
    """
    scale = q.shape[-1] ** -0.5
    if impl in ("splash", SPLASH_INTERPRET):
        return splash(q, k, v, prefix, segments, scale, interpret=impl == SPLASH_INTERPRET)
    if impl in ("cudnn", CUDNN_XLA):
        return cudnn(q, k, v, prefix, segments, scale, kernel="xla" if impl == CUDNN_XLA else "cudnn")
    B, S = q.shape[:2]
    seg = jnp.ones((B, S), jnp.int32) if segments is None else segments.astype(jnp.int32)
    pos = jnp.arange(S, dtype=jnp.int32)
    if prefix is not None:
        T = prefix[0].shape[0]
        k, v = (jnp.concatenate([jnp.broadcast_to(p.astype(x.dtype), (B,) + p.shape), x], axis=1)
                for p, x in zip(prefix, (k, v)))
        kv_pos = jnp.concatenate([jnp.full((T,), -1, jnp.int32), pos])
        kv_seg = jnp.concatenate([jnp.ones((B, T), jnp.int32), seg], axis=1)
    else:
        kv_pos, kv_seg = pos, seg
    return masked_attention(q, k, v, pos, kv_pos, seg, kv_seg, impl)


def masked_attention(q: Array, k: Array, v: Array, q_pos: Array, kv_pos: Array, q_seg: Array,
                     kv_seg: Array, impl: str, block: int = BLOCK) -> Array:
    """The rule of the module docstring with explicit positions and segments (also the KV-cache
    path). q [B, Sq, nH, hd], k/v [B, Skv, nKV, hd], q_pos [Sq], kv_pos [Skv], q_seg [B, Sq],
    kv_seg [B, Skv]. ``xla`` materialises the mask; every other implementation runs ``chunked``."""
    scale = q.shape[-1] ** -0.5
    if impl == "xla":
        mask = (kv_pos[None, None, :] <= q_pos[None, :, None]) & (kv_seg[:, None, :] == q_seg[:, :, None])
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation="xla")
    return chunked(q, k, v, q_pos, kv_pos, q_seg, kv_seg, scale, block)


# ---- chunked: blockwise online softmax, flash-attention backward --------------------------
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_to(x: Array, n: int, axis: int, value) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _blocked(x: Array, n: int, axis: int) -> Array:
    """Split ``axis`` into (n, size/n) and move the block index to the front."""
    shape = x.shape[:axis] + (n, x.shape[axis] // n) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocked(x: Array, axis: int) -> Array:
    """Inverse of :func:`_blocked` (block index in front, merged back at ``axis``)."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _rows(x: Array) -> Array:
    """[B, nKV, bq, G, X] -> [B, nKV, bq*G, X]: a block's queries (grouped heads) as one matrix."""
    return x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:])


def chunked(q: Array, k: Array, v: Array, q_pos: Array, kv_pos: Array, q_seg: Array, kv_seg: Array,
            scale: float, block: int = BLOCK) -> Array:
    """Blockwise attention; shapes as :func:`masked_attention`. Grouped heads are kept grouped
    (no repeat of the KV heads). Inside, heads lead: queries [B, nKV, Sq, G, hd], keys/values
    [B, nKV, Skv, hd], so every score-sized product is a plain batched matrix product of
    [bq*G, hd] and [bk, hd] blocks and no score-sized array is ever transposed (on XLA:CPU a
    transposed operand is a copy)."""
    B, Sq, nH, hd = q.shape
    Skv, nKV = k.shape[1], k.shape[2]
    bq, bk = min(block, Sq), min(block, Skv)
    Sq_p, Skv_p = _round_up(Sq, bq), _round_up(Skv, bk)
    # padded queries see nothing (an all-masked row gives 0); padded keys are seen by nobody
    qg = jnp.transpose(_pad_to(q.reshape(B, Sq, nKV, nH // nKV, hd), Sq_p, 1, 0), (0, 2, 1, 3, 4))
    k, v = (jnp.swapaxes(_pad_to(x, Skv_p, 1, 0), 1, 2) for x in (k, v))
    q_pos, kv_pos = _pad_to(q_pos.astype(jnp.int32), Sq_p, 0, -2 ** 30), _pad_to(kv_pos.astype(jnp.int32), Skv_p, 0, 2 ** 30)
    q_seg, kv_seg = _pad_to(q_seg.astype(jnp.int32), Sq_p, 1, -2), _pad_to(kv_seg.astype(jnp.int32), Skv_p, 1, -1)
    out = _flash(qg, k, v, q_pos, kv_pos, q_seg, kv_seg, float(scale), bq, bk)
    return jnp.transpose(out, (0, 2, 1, 3, 4))[:, :Sq].reshape(B, Sq, nH, hd)


def _scores(qb, kb, qp, kp, qs, ks, scale):
    """Masked scores [B, nKV, bq, G, bk] in float32 (-inf where not allowed) of a query block
    qb [B, nKV, bq, G, hd] and a key block kb [B, nKV, bk, hd]."""
    B, nKV, bq, G, _ = qb.shape
    s = jnp.einsum("bkmd,bksd->bkms", _rows(qb), kb, preferred_element_type=jnp.float32) * scale
    ok = (kp[None, None, :] <= qp[None, :, None]) & (ks[:, None, :] == qs[:, :, None])  # [B, bq, bk]
    return jnp.where(ok[:, None, :, None, :], s.reshape(B, nKV, bq, G, -1), -jnp.inf)


def _needed(q_pos_b: Array, kv_pos_b: Array) -> Array:
    """[nq, nk]: blocks with at least one causally visible pair (the others are skipped)."""
    return jnp.min(kv_pos_b, axis=1)[None, :] <= jnp.max(q_pos_b, axis=1)[:, None]


def _flash_forward(qg, k, v, q_pos, kv_pos, q_seg, kv_seg, scale, bq, bk):
    nq, nk = qg.shape[2] // bq, k.shape[2] // bk
    kb, vb = _blocked(k, nk, 2), _blocked(v, nk, 2)
    kpb, ksb = _blocked(kv_pos, nk, 0), _blocked(kv_seg, nk, 1)
    qpb = _blocked(q_pos, nq, 0)
    need = _needed(qpb, kpb)

    def q_block(xs):
        qb, qp, qs, need_row = xs

        def kv_step(carry, ys):
            def compute(c):
                m, l, acc = c
                s = _scores(qb, kj, qp, kp, qs, ks, scale)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(s - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                pv = jnp.einsum("bkms,bksd->bkmd", _rows(p.astype(vj.dtype)), vj, preferred_element_type=jnp.float32)
                return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv.reshape(acc.shape)

            kj, vj, kp, ks, nd = ys
            return jax.lax.cond(nd, compute, lambda c: c, carry), None

        init = (jnp.full(qb.shape[:-1], -jnp.inf, jnp.float32), jnp.zeros(qb.shape[:-1], jnp.float32),
                jnp.zeros(qb.shape, jnp.float32))
        (m, l, acc), _ = jax.lax.scan(kv_step, init, (kb, vb, kpb, ksb, need_row))
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)  # inf: the row sees nothing
        return out.astype(qg.dtype), lse

    out, lse = jax.lax.map(q_block, (_blocked(qg, nq, 2), qpb, _blocked(q_seg, nq, 1), need))
    return _unblocked(out, 2), lse  # lse stays blocked: [nq, B, nKV, bq, G]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _flash(qg, k, v, q_pos, kv_pos, q_seg, kv_seg, scale, bq, bk):
    return _flash_forward(qg, k, v, q_pos, kv_pos, q_seg, kv_seg, scale, bq, bk)[0]


def _flash_fwd(qg, k, v, q_pos, kv_pos, q_seg, kv_seg, scale, bq, bk):
    out, lse = _flash_forward(qg, k, v, q_pos, kv_pos, q_seg, kv_seg, scale, bq, bk)
    return out, (qg, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _flash_bwd(scale, bq, bk, res, dout):
    """ds = p * (dO.v - D) with D = sum(dO * O); dq = ds k, dk = ds^T q, dv = p^T dO (times
    scale for dq/dk). One pass: for each key block, over the query blocks, p and ds are
    recomputed once and feed all three (dk and dv as [hd, bk] products, so that p and ds are
    used in their own layout); dq accumulates across key blocks."""
    qg, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = res
    nq, nk = qg.shape[2] // bq, k.shape[2] // bk
    D = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, nKV, Sq, G]
    qb, dob, Db = _blocked(qg, nq, 2), _blocked(dout, nq, 2), _blocked(D, nq, 2)
    qpb, qsb = _blocked(q_pos, nq, 0), _blocked(q_seg, nq, 1)
    kb, vb = _blocked(k, nk, 2), _blocked(v, nk, 2)
    kpb, ksb = _blocked(kv_pos, nk, 0), _blocked(kv_seg, nk, 1)
    need = _needed(qpb, kpb)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def kv_block(dq, j):
        def step(carry, i):
            def upd(c):
                dq, dk, dv = c
                p = jnp.exp(_scores(qb[i], kb[j], qpb[i], kpb[j], qsb[i], ksb[j], scale) - lse[i][..., None])
                dp = jnp.einsum("bkmd,bksd->bkms", _rows(dob[i]), vb[j], preferred_element_type=jnp.float32)
                ds = _rows(p * (dp.reshape(p.shape) - Db[i][..., None]))
                dv = dv + jnp.einsum("bkmd,bkms->bkds", f32(_rows(dob[i])), _rows(p))
                dk = dk + jnp.einsum("bkmd,bkms->bkds", f32(_rows(qb[i])), ds)
                return dq.at[i].add(jnp.einsum("bkms,bksd->bkmd", ds, f32(kb[j])).reshape(qb.shape[1:])), dk, dv

            return jax.lax.cond(need[i, j], upd, lambda c: c, carry), None

        zeros = jnp.zeros(jnp.swapaxes(kb[j], -1, -2).shape, jnp.float32)  # dk, dv as [B, nKV, hd, bk]
        (dq, dk, dv), _ = jax.lax.scan(step, (dq, zeros, zeros), jnp.arange(nq))
        return dq, (jnp.swapaxes(dk * scale, -1, -2).astype(k.dtype), jnp.swapaxes(dv, -1, -2).astype(v.dtype))

    dq, (dk, dv) = jax.lax.scan(kv_block, jnp.zeros(qb.shape, jnp.float32), jnp.arange(nk))
    dq = (_unblocked(dq, 2) * scale).astype(qg.dtype)
    return dq, _unblocked(dk, 2), _unblocked(dv, 2), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---- splash (TPU) ---------------------------------------------------------------------------
def splash(q: Array, k: Array, v: Array, prefix, segments, scale: float, interpret: bool = False) -> Array:
    """Splash attention over [prefix (padded to a block) | tokens]; shapes as :func:`self_attention`."""
    B, S, nH, hd = q.shape
    nKV = k.shape[2]
    T = 0 if prefix is None else prefix[0].shape[0]
    Tp, Sp = _round_up(T, SPLASH_BLOCK), _round_up(S, SPLASH_BLOCK)
    seg = jnp.ones((B, S), jnp.int32) if segments is None else segments.astype(jnp.int32)
    # padding at the end: its own segment (2), so it sees itself and no real token sees it;
    # the unused prefix slots: a segment no query has (3)
    seg = _pad_to(seg, Sp, 1, 2)
    kv_seg = jnp.concatenate([jnp.ones((B, T), jnp.int32), jnp.full((B, Tp - T), 3, jnp.int32), seg], axis=1)
    qh = jnp.swapaxes(_pad_to(q * jnp.asarray(scale, q.dtype), Sp, 1, 0), 1, 2)  # [B, nH, Sp, hd]

    def keys(x, p):
        x = _pad_to(x, Sp, 1, 0)
        if Tp:
            pre = jnp.zeros((Tp, nKV, hd), x.dtype) if p is None else _pad_to(p.astype(x.dtype), Tp, 0, 0)
            x = jnp.concatenate([jnp.broadcast_to(pre, (B,) + pre.shape), x], axis=1)
        return jnp.swapaxes(x, 1, 2)  # [B, nKV, Tp + Sp, hd]

    kh, vh = keys(k, None if prefix is None else prefix[0]), keys(v, None if prefix is None else prefix[1])

    def kernel(qh, kh, vh, qs, ks):
        from jax.experimental.pallas.ops.tpu import splash_attention as sa

        heads = qh.shape[1]
        mask = sa.MultiHeadMask([sa.CausalMask((Sp, Tp + Sp), offset=Tp) for _ in range(heads)])
        fn = sa.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)
        return jax.vmap(lambda a, b, c, d, e: fn(a, b, c, segment_ids=sa.SegmentIds(d, e)))(qh, kh, vh, qs, ks)

    out = _on_mesh(kernel, qh, kh, vh, seg, kv_seg)
    return jnp.swapaxes(out, 1, 2)[:, :S]


def _mesh_specs(B: int, nH: int, nKV: int):
    """(mesh, batch axes spec, heads axis) for running a per-device kernel on [B, ..., heads, ...]
    operands: batch over the batch axes that divide it, heads over ``tensor`` when it divides
    the query heads (None: a mesh of one device, run the kernel as it is)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return None, None, None
    batch = tuple(a for a in S.BATCH_AXES if mesh.shape.get(a, 1) > 1)
    while batch and B % math.prod(mesh.shape[a] for a in batch):
        batch = batch[1:]
    t = mesh.shape.get("tensor", 1)
    heads = "tensor" if t > 1 and nH % t == 0 else None
    return mesh, (batch if len(batch) > 1 else (batch[0] if batch else None)), heads


def _on_mesh(kernel, qh, kh, vh, qs, ks):
    """Run a per-device kernel on [B, heads, S, hd] operands: under ``jax.shard_map`` when a mesh
    of several devices is active (:func:`_mesh_specs`; the KV heads are repeated when ``tensor``
    divides the query heads but not the KV heads)."""
    mesh, b, heads = _mesh_specs(qh.shape[0], qh.shape[1], kh.shape[1])
    if mesh is None:
        return kernel(qh, kh, vh, qs, ks)
    if heads and kh.shape[1] % mesh.shape["tensor"]:
        kh, vh = (jnp.repeat(x, qh.shape[1] // kh.shape[1], axis=1) for x in (kh, vh))
    spec4, spec2 = Pspec(b, heads, None, None), Pspec(b, None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec4, spec4, spec4, spec2, spec2), out_specs=spec4,
                         check_vma=False)(qh, kh, vh, qs, ks)


# ---- cudnn (GPU) ------------------------------------------------------------------------------
def cudnn(q: Array, k: Array, v: Array, prefix, segments, scale: float, kernel: str = "cudnn") -> Array:
    """cuDNN flash attention; shapes as :func:`self_attention`. Runs inside ``jax.shard_map``
    (batch over the batch axes, heads over ``tensor``; the stream axis joins through the stream
    vmap's ``spmd_axis_name``), so each GPU's fused call holds only its own rows: left to
    cuDNN's own partitioning under the stream vmap, q/k/v were all-gathered over the batch.
    ``kernel="xla"`` runs JAX's XLA implementation of the same call (the CPU tests)."""
    B, S, nH, hd = q.shape
    nKV = k.shape[2]
    seg = jnp.ones((B, S), jnp.int32) if segments is None else segments.astype(jnp.int32)
    pre = () if prefix is None else tuple(p.astype(q.dtype) for p in prefix)
    body = functools.partial(_cudnn_local, scale=scale, kernel=kernel, padded=segments is not None)
    mesh, b, heads = _mesh_specs(B, nH, nKV)
    if mesh is None:
        return body(q, k, v, seg, *pre)
    if heads and nKV % mesh.shape["tensor"]:
        rep = functools.partial(jnp.repeat, repeats=nH // nKV, axis=-2)
        k, v, pre = rep(k), rep(v), tuple(rep(p) for p in pre)
    x4, x2, x3 = Pspec(b, None, heads, None), Pspec(b, None), Pspec(None, heads, None)
    return jax.shard_map(body, mesh=mesh, in_specs=(x4, x4, x4, x2) + (x3,) * len(pre), out_specs=x4,
                         check_vma=False)(q, k, v, seg, *pre)


def _cudnn_local(q, k, v, seg, *prefix, scale: float, kernel: str, padded: bool):
    """One device's cuDNN call: T zero queries and the T prefix keys go in front, so the causal
    mask over T + S is "every prefix key, then the tokens up to the query"; left-padded rows are
    rolled so their real tokens come first, their lengths passed to cuDNN, and rolled back; a
    padded query's output is set to zero (cuDNN masks it out; see the module docstring)."""
    B, S = q.shape[:2]
    lengths = None
    if padded:
        n_pad = S - jnp.sum(seg, axis=1)
        idx = (jnp.arange(S)[None, :] + n_pad[:, None]) % S  # new slot p holds old slot p + n_pad
        q, k, v = (jnp.take_along_axis(x, idx[:, :, None, None], axis=1) for x in (q, k, v))
        lengths = (S - n_pad).astype(jnp.int32)
    T = 0
    if prefix:
        T = prefix[0].shape[0]
        q = jnp.concatenate([jnp.zeros((B, T) + q.shape[2:], q.dtype), q], axis=1)
        k, v = (jnp.concatenate([jnp.broadcast_to(p.astype(x.dtype), (B,) + p.shape), x], axis=1)
                for p, x in zip(prefix, (k, v)))
    kw = {} if lengths is None else dict(query_seq_lengths=lengths + T, key_value_seq_lengths=lengths + T)
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=kernel, **kw)[:, T:]
    if lengths is not None:
        back = (jnp.arange(S)[None, :] - n_pad[:, None]) % S
        out = jnp.take_along_axis(out, back[:, :, None, None], axis=1)
        out = jnp.where(seg[:, :, None, None] > 0, out, jnp.zeros((), out.dtype))
    return out
