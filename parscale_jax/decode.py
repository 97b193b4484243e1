"""Generation: a jit-compiled prefill and a compiled decode loop over a preallocated KV cache.

    cache  = init_cache(...)                  per stream: T prefix slots, then the tokens
    prefill: logits, cache = model(prompts [B, S] left-padded, mask, cache)
             next = sample(logits[:, -1])     (left padding: the last column is always real)
    decode : lax.scan of ``chunk`` steps, each feeding one token per row and sampling the next;
             rows that emitted EOS are finished and emit ``pad_id`` from then on.

Each chunk comes back to the host, so tokens can be printed as they come; the chunk function
is compiled once per (batch, cache length): sampling settings and EOS are traced values. Keys are
``fold_in(seed_key, step)``, so a seed gives the same text whatever the chunk size.

Served as: the weights in the *serving dtype* (:func:`serving_params`, cast once when the
generator is built, so a step reads each weight once in that dtype instead of reading float32 and
casting per step), and the cache (with the step's other carried state) donated to prefill and to
every chunk, so the compiled programs update it in place (XLA aliases it: one cache lives, not
two). A donated argument is consumed: keep the returned cache, never the one passed in.

The cache's batch axis is axis 2 of ``k``/``v`` ([P, L, B, T + max_len, nKV, hd]) and axis 0
of ``valid``; :func:`reorder_cache` moves all P streams of a sequence together (beams, batch
compaction).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from parscale_jax import model as M
from parscale_jax.errors import UserError

Array = jax.Array


# ---- cache -------------------------------------------------------------------------------
def reorder_cache(cache: dict, indices: Array) -> dict:
    """Row ``i`` of the new cache is row ``indices[i]`` of the old one, for every stream and layer."""
    indices = jnp.asarray(indices, jnp.int32)
    return {"k": jnp.take(cache["k"], indices, axis=2), "v": jnp.take(cache["v"], indices, axis=2),
            "valid": jnp.take(cache["valid"], indices, axis=0), "index": cache["index"]}


# ---- sampling ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off (applied in that order, as HF does)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (self.temperature >= 0.0):
            raise UserError(f"--temperature {self.temperature} is invalid: use 0 (greedy) or a positive value")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k} is invalid: use 0 (off) or a positive integer")
        if not (0.0 < self.top_p <= 1.0):
            raise UserError(f"--top-p {self.top_p} is invalid: it must lie in (0, 1] (1 = off)")

    def astuple(self) -> tuple:
        """(temperature, top_k, top_p) as arrays: traced arguments, not compile-time constants."""
        return (jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p))


def filter_logits(logits: Array, top_k: Array | int = 0, top_p: Array | float = 1.0) -> Array:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. logits [B, V] float32.

    ``top_k`` 0 = off. Nucleus: keep the smallest set of most likely tokens whose probability
    reaches ``top_p`` (the most likely token is always kept); 1.0 = off. Both may be traced
    values, so one compiled function serves every setting.
    """
    V = logits.shape[-1]
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    srt = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
    k = jnp.where(jnp.asarray(top_k) > 0, jnp.minimum(jnp.asarray(top_k), V), V)
    kth = jnp.take(srt, k - 1, axis=-1)[..., None]
    srt = jnp.where(srt < kth, neg, srt)
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = (before < top_p) | (jnp.asarray(top_p) >= 1.0)
    keep = keep & (srt > neg)
    # the smallest kept logit is the threshold (the first sorted entry is always kept)
    thresh = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < thresh, neg, logits)


def sample(logits: Array, key: Array, sampling: "Sampling | tuple") -> Array:
    """Next token ids [B] from last-position logits [B, V]; temperature 0 is argmax."""
    temperature, top_k, top_p = sampling.astuple() if isinstance(sampling, Sampling) else sampling
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.asarray(temperature, jnp.float32)
    scaled = filter_logits(logits / jnp.where(t > 0, t, 1.0), top_k, top_p)
    drawn = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(t > 0, drawn, greedy)


# ---- the serving dtype -------------------------------------------------------------------
SERVE_DTYPES = ("bfloat16", "float16", "float32")


def serve_dtype_of(serve_dtype: str | None, compute_dtype: Any) -> str:
    """The serving dtype's name: ``serve_dtype`` ("auto" or None: the compute dtype), checked."""
    if serve_dtype in (None, "", "auto"):
        return jnp.dtype(compute_dtype).name
    if serve_dtype not in SERVE_DTYPES:
        raise UserError(f"--serve-dtype {serve_dtype!r} is not a serving dtype: choose one of "
                        f"{', '.join(SERVE_DTYPES)} (or auto: the compute dtype)")
    return serve_dtype


def serving_params(params: Any, serve_dtype: str) -> Any:
    """The params as served: every floating leaf in ``serve_dtype`` (numpy stays numpy, arrays
    stay arrays; a leaf already in that dtype is not copied). With the serving dtype equal to
    the compute dtype the model's per-use casts are no-ops, so a decode step reads the weights
    once, in that dtype; the values are those the per-step cast of float32 weights gives."""
    dt = jnp.dtype(serve_dtype)

    def cast(a):
        if not jnp.issubdtype(a.dtype, jnp.floating) or a.dtype == dt:
            return a
        if isinstance(a, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(a.shape, dt, sharding=a.sharding)
        return a.astype(dt)

    return jax.tree.map(cast, params)


# ---- the decoding layout -------------------------------------------------------------------
def decoding_layout(model: Any, params: Any, platform: str | None = None) -> tuple[Any, Any]:
    """(model, params) as the generator decodes with them. On CPU: the Python loop over layers
    with one buffer per layer (:func:`model.unstack_layers`, a copy of the weights made once).
    XLA:CPU copies a scanned layer's weights out of the stacked [L, ...] array before each
    matmul; at batch 1, where a decode step is one pass over the weights, that write and second
    read made the step 2.6x as slow as the matmuls alone (paper-0.5b backbone,
    ``bench/decode.py --floor``). Elsewhere (TPU, GPU) the scanned, stacked layout is kept:
    no second copy of the weights in accelerator memory."""
    if (platform or jax.default_backend()).lower() != "cpu":
        return model, params
    return model.clone(scan_layers=False), M.unstack_layers(params)


# ---- prefill and decode steps ------------------------------------------------------------
def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to one length: (tokens [B, S] int32, mask [B, S] bool)."""
    S = max(len(p) for p in prompts) if length is None else length
    tokens = np.full((len(prompts), S), pad_id, np.int32)
    mask = np.zeros((len(prompts), S), bool)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, S - len(p):] = np.asarray(p, np.int32)
            mask[i, S - len(p):] = True
    return tokens, mask


def make_prefill(model: Any) -> Callable:
    """jit: (params, cache, tokens [B, S], mask [B, S]) -> (last-position logits [B, V] f32, cache).
    The cache is donated (updated in place): the one passed in is consumed."""

    @functools.partial(jax.jit, donate_argnums=(1,))
    def prefill(params, cache, tokens, mask):
        logits, cache = model.apply({"params": params}, tokens, attention_mask=mask, cache=cache)
        return logits[:, -1].astype(jnp.float32), cache

    return prefill


def make_decode_chunk(model: Any, pad_id: int, chunk: int) -> Callable:
    """jit: ``chunk`` decode steps in one lax.scan.

    (params, cache, token [B], done [B], key, step0, sampling (t, k, p), eos) ->
    (tokens [B, chunk], cache, token, done). ``token`` is the last sampled (not yet fed) token;
    a row becomes done after emitting EOS (``eos`` < 0: never); done rows feed pad (masked out
    of the cache) and emit ``pad_id``. Sampling settings and EOS are traced: one compilation.
    The carried state (cache, token, done) is donated: the compiled chunk updates it in place,
    and the arrays passed in are consumed (pass the returned ones to the next chunk).
    """

    def one(params, sampling, eos, carry, i):
        cache, token, done, key, step0 = carry
        logits, cache = model.apply({"params": params}, token[:, None], attention_mask=(~done)[:, None],
                                    cache=cache)
        nxt = sample(logits[:, 0], jax.random.fold_in(key, step0 + i), sampling)
        nxt = jnp.where(done, pad_id, nxt)
        done = done | (nxt == eos)
        return (cache, nxt, done, key, step0), nxt

    @functools.partial(jax.jit, donate_argnums=(1, 2, 3))
    def decode_chunk(params, cache, token, done, key, step0, sampling, eos):
        (cache, token, done, _, _), toks = jax.lax.scan(
            functools.partial(one, params, sampling, eos), (cache, token, done, key, step0), jnp.arange(chunk))
        return jnp.transpose(toks), cache, token, done

    return decode_chunk


# ---- the generator -----------------------------------------------------------------------
class Generator:
    """Batched generation for one model and params; compiled functions are cached per setting.

    ``generate(prompts, max_new_tokens, ...)`` returns the new tokens per row (EOS included,
    nothing after it) and calls ``on_chunk(tokens [B, k] np.int32)`` as chunks arrive; when it
    returns True, generation stops there (e.g. every row holds a stop string). ``prompt_len``
    left-pads the prompts to that length (a fixed shape: one compilation for many batches).
    The weights are cast once to ``serve_dtype`` (default "auto": the model's compute dtype;
    see :func:`serving_params`), and on CPU laid out per layer (:func:`decoding_layout`): the
    generator holds its own copy whenever either changes them, so a caller that no longer needs
    ``params`` can drop them.
    """

    def __init__(self, model: Any, params: Any, eos_id: int | None, pad_id: int, chunk: int = 16,
                 cache_dtype: Any = None, serve_dtype: str | None = "auto"):
        self.serve_dtype = serve_dtype_of(serve_dtype, model.dtype)
        model, params = decoding_layout(model, serving_params(params, self.serve_dtype))
        self.model, self.params, self.cfg = model, params, model.cfg
        self.eos_id, self.pad_id, self.chunk = eos_id, pad_id, int(chunk)
        self.cache_dtype = cache_dtype
        self.prefill = make_prefill(model)
        self._decode_chunk = make_decode_chunk(model, pad_id, self.chunk)
        self._init_cache = jax.jit(functools.partial(M.init_cache, model, dtype=cache_dtype),
                                   static_argnums=(1, 2))
        self._sample_first = jax.jit(sample)

    def check_lengths(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
        """Validate prompt lengths against the model's positions; return the usable max_new_tokens."""
        limit = self.cfg.max_position_embeddings
        longest = max(len(p) for p in prompts)
        if any(len(p) == 0 for p in prompts):
            raise UserError("a prompt is empty: give at least one character per prompt (one prompt per line)")
        if longest >= limit:
            raise UserError(f"a prompt has {longest} tokens but the model has {limit} positions "
                            f"(max_position_embeddings): shorten the prompt to under {limit} tokens")
        if max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {max_new_tokens} is invalid: use a positive integer")
        return min(max_new_tokens, limit - longest)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 seed: int = 0, on_chunk: Callable[[np.ndarray], bool | None] | None = None,
                 prompt_len: int | None = None) -> list[np.ndarray]:
        N = self.check_lengths(prompts, max_new_tokens)
        tokens, mask = left_pad(prompts, self.pad_id, prompt_len)
        B, S = tokens.shape
        n_chunks = -(-(N - 1) // self.chunk)
        cache = self._init_cache(self.params, B, S + n_chunks * self.chunk)
        key = jax.random.PRNGKey(seed)
        logits, cache = self.prefill(self.params, cache, tokens, mask)
        st = sampling.astuple()
        eos = jnp.int32(-1 if self.eos_id is None else self.eos_id)
        token = self._sample_first(logits, jax.random.fold_in(key, 0), st)
        done = token == eos
        first = np.asarray(token)[:, None]
        stop = bool(on_chunk(first)) if on_chunk else False
        out, emitted = [first], 1
        for c in range(n_chunks):
            if stop or bool(jnp.all(done)):
                break
            toks, cache, token, done = self._decode_chunk(self.params, cache, token, done, key,
                                                          jnp.int32(1 + c * self.chunk), st, eos)
            toks = np.asarray(toks)[:, : N - emitted]  # the last chunk may run past N
            emitted += toks.shape[1]
            stop = bool(on_chunk(toks)) if on_chunk else False
            out.append(toks)
        allt = np.concatenate(out, axis=1)
        return [_until_eos(row, self.eos_id) for row in allt]


def _until_eos(row: np.ndarray, eos_id: int | None) -> np.ndarray:
    if eos_id is not None:
        hits = np.flatnonzero(row == eos_id)
        if len(hits):
            return row[: hits[0] + 1]
    return row
