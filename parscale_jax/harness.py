"""lm-evaluation-harness on any checkpoint, in JAX: the ``parscale-jax`` LM (:class:`JaxLM`).

    lm = JaxLM(checkpoint="runs/demo/P4", batch_size=8)        # or JaxLM.from_model(model, params, tok)
    lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=TaskManager(include_path=...))

* ``loglikelihood``: requests are encoded by lm-eval's own ``TemplateLM`` (``_encode_pair``: the
  context's trailing whitespace moves to the continuation, the continuation is the tail of
  encode(context + continuation); an empty context is ``prefix_token_id``, EOS here, as every
  document follows EOS in training), cut from the left to ``max_length + 1`` tokens as lm-eval's
  HF backend does, sorted longest first, and scored ``batch_size`` at a time. Each batch is
  right-padded to the smallest of a few fixed lengths (:func:`length_buckets`) that holds it, and the
  batch axis is always ``batch_size`` rows: at most one compilation per length bucket. One jitted
  forward per batch runs all P streams and returns the summed log-probs and the greedy flags; the
  LM head runs over chunks of the sequence (no full [B, L, V] float32 logits).
* ``loglikelihood_rolling``: lm-eval's rolling windows (``get_rolling_token_windows`` with context 1,
  ``make_disjoint_window``), scored as loglikelihood requests (bits per byte, word perplexity).
* ``generate_until``: the project's KV-cached :class:`parscale_jax.decode.Generator`, greedy unless
  the task samples; rows stop at EOS; generation stops once every row holds one of the stop
  strings, and each text is cut at them by lm-eval's ``postprocess_generated_text``.
* Multi-process (``jax.process_count() > 1``): every process builds the same JaxLM; process 0 runs
  the harness and the others call :meth:`JaxLM.serve`. Each loglikelihood batch is broadcast
  (``multihost_utils.broadcast_one_to_all``) and scored by one program over the mesh of all devices
  (params laid out by the model's logical axes, the batch split over ``fsdp``); a generation
  request is broadcast and every process decodes it on its own devices.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from parscale_jax import data, loading, sharding
from parscale_jax import decode as D
from parscale_jax import model as M
from parscale_jax.errors import UserError
from parscale_jax.loss import CHUNK, token_nll
from parscale_jax.train_config import MeshConfig

SMALLEST_BUCKET = 64
_STOP, _SCORE, _GENERATE = 0, 1, 2  # what process 0 asks the serving processes to do


def length_buckets(max_length: int, smallest: int = SMALLEST_BUCKET) -> tuple[int, ...]:
    """The padded lengths a batch may take: ``smallest``, twice that, ... below ``max_length``, then
    ``max_length`` itself."""
    out, b = [], max(1, int(smallest))
    while b < max_length:
        out.append(b)
        b *= 2
    return tuple(out) + (int(max_length),)


def score_batch(model: Any, params: Any, x: jax.Array, y: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row of inputs x [B, L], targets y [B, L] and weights w [B, L] (1 = scored): (summed
    log p(y_t | x_<=t) over the scored positions [B] float32, whether every scored target is the
    argmax [B] bool). The LM head runs over chunks of the sequence."""
    h, _ = model.apply({"params": params}, x, method=M.ParScaleLM.hidden)
    head = M.lm_head_kernel(model.cfg, params).astype(model.dtype)
    B, L, H = h.shape
    c = min(CHUNK, L)
    n = -(-L // c)
    pad = ((0, 0), (0, n * c - L))
    hs = jnp.pad(h, pad + ((0, 0),)).reshape(B, n, c, H).swapaxes(0, 1)
    ys = jnp.pad(y, pad).reshape(B, n, c).swapaxes(0, 1)

    def one(_, xs):
        hc, yc = xs
        logits = jnp.einsum("bch,hv->bcv", hc, head, preferred_element_type=jnp.float32)
        return None, (-token_nll(logits, yc), jnp.argmax(logits, axis=-1) == yc)

    _, (lp, hit) = jax.lax.scan(one, None, (hs, ys))
    lp = lp.swapaxes(0, 1).reshape(B, n * c)[:, :L]
    hit = hit.swapaxes(0, 1).reshape(B, n * c)[:, :L]
    return jnp.sum(lp * w, axis=1), jnp.all(hit | (w == 0), axis=1)


def _global(x: np.ndarray, sharding_: Any) -> jax.Array:
    """A global array from the same host value on every process."""
    return jax.make_array_from_callback(x.shape, sharding_, lambda idx: x[idx])


def _local(a: jax.Array) -> np.ndarray:
    """The value of a fully replicated (global) array on this host."""
    return np.asarray(a.addressable_data(0))


@register_model("parscale-jax")
class JaxLM(TemplateLM):
    """An lm-eval ``TemplateLM`` over the JAX model of a checkpoint (any kind the loader reads).

    ``JaxLM(checkpoint, P=None, batch_size=8, max_length=None, tokenizer=None, dtype="float32")``:
    the tokenizer defaults to the checkpoint's (``loading.tokenizer_of``; bytes when none),
    ``max_length`` to the model's positions.
    """

    def __init__(self, checkpoint: str | None = None, P: int | str | None = None, batch_size: int | str = 8,
                 max_length: int | str | None = None, tokenizer: str | None = None, dtype: str = "float32",
                 prefix_token_id: int | str | None = None, max_gen_toks: int | str = 256,
                 smallest_bucket: int | str = SMALLEST_BUCKET, **unused: Any):
        super().__init__()
        if checkpoint is None:
            raise UserError("parscale-jax needs checkpoint=PATH (model_args): a training workdir, a saved model "
                            "or a Hugging Face directory")
        cfg, params = loading.load(checkpoint, None if P in (None, "") else int(P))
        tok = data.load_tokenizer(tokenizer or loading.tokenizer_of(checkpoint) or "bytes")
        self._setup(M.make_model(cfg, dtype=dtype), params, tok, batch_size, max_length, prefix_token_id,
                    max_gen_toks, smallest_bucket)

    @classmethod
    def from_model(cls, model: Any, params: Any, tokenizer: Any, batch_size: int = 8, max_length: int | None = None,
                   prefix_token_id: int | None = None, max_gen_toks: int = 256,
                   smallest_bucket: int = SMALLEST_BUCKET) -> "JaxLM":
        """The LM of a model and params in hand (no checkpoint)."""
        self = cls.__new__(cls)
        TemplateLM.__init__(self)
        self._setup(model, params, tokenizer, batch_size, max_length, prefix_token_id, max_gen_toks, smallest_bucket)
        return self

    def _setup(self, model, params, tok, batch_size, max_length, prefix_token_id, max_gen_toks, smallest_bucket):
        limit = model.cfg.max_position_embeddings
        self._max_length = limit if max_length in (None, "") else int(max_length)
        if not 1 <= self._max_length <= limit:
            raise UserError(f"max_length {self._max_length} is invalid: use 1..{limit} (the model's positions)")
        n_dev = jax.device_count()
        self._batch = -(-int(batch_size) // n_dev) * n_dev  # a multiple of the devices the batch is split over
        if self._batch < 1:
            raise UserError(f"batch size {batch_size} is invalid: use a positive integer")
        self.model, self.tok = model, tok
        self._prefix = int(tok.eos_id if prefix_token_id in (None, "") else prefix_token_id)
        self._max_gen_toks = int(max_gen_toks)
        self.buckets = length_buckets(self._max_length, int(smallest_bucket))
        self.mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1))
        shard = sharding.tree_shardings(M.logical_axes(model), M.abstract_params(model), self.mesh)
        self.params = jax.tree.map(lambda a, s: _global(np.asarray(a), s), params, shard)
        self._host_params = params
        self._rows = sharding.batch_sharding(self.mesh)
        self._score = jax.jit(functools.partial(score_batch, model),
                              out_shardings=sharding.replicated(self.mesh))
        self._generator = None

    # ---- what lm-eval asks of a TemplateLM -------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eos_id)

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return [int(t) for t in self.tok.encode(string)]

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tok.decode([int(t) for t in tokens if int(t) != self.eot_token_id])

    # ---- loglikelihood ---------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(summed log-prob, greedy) of each (strings, context ids, continuation ids), in order."""
        seqs, n_cont = [], []
        for _, ctx, cont in requests:
            if not cont:
                raise UserError("a loglikelihood request has an empty continuation: the task must give a target")
            full = (list(ctx) + list(cont))[-(self._max_length + 1):]
            seqs.append(full)
            n_cont.append(min(len(cont), len(full) - 1))
        order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), tuple(seqs[i])))
        ll, greedy = np.zeros(len(seqs), np.float64), np.zeros(len(seqs), bool)
        bar = tqdm(total=len(seqs), desc="loglikelihood (parscale-jax)", disable=disable_tqdm)
        for b in range(0, len(order), self._batch):
            idx = order[b: b + self._batch]
            longest = len(seqs[idx[0]]) - 1
            L = next(k for k in self.buckets if k >= longest)
            x = np.zeros((self._batch, L), np.int32)
            y = np.zeros((self._batch, L), np.int32)
            w = np.zeros((self._batch, L), np.float32)
            for row, i in enumerate(idx):
                s, m = seqs[i], len(seqs[i]) - 1
                x[row, :m], y[row, :m] = s[:-1], s[1:]
                w[row, m - n_cont[i]: m] = 1.0
            if jax.process_count() > 1:
                self._announce(_SCORE, *x.shape)
            lp, hit = self._run_score(x, y, w)
            ll[idx], greedy[idx] = lp[: len(idx)], hit[: len(idx)]
            bar.update(len(idx))
        bar.close()
        return [(float(a), bool(g)) for a, g in zip(ll, greedy)]

    def _run_score(self, x, y, w) -> tuple[np.ndarray, np.ndarray]:
        """One batch through the jitted forward on the mesh (every process calls it with the same arrays)."""
        if jax.process_count() > 1:
            x, y, w = (multihost_utils.broadcast_one_to_all(a) for a in (x, y, w))
        with sharding.activate(self.mesh):
            lp, hit = self._score(self.params, *(_global(np.asarray(a), self._rows) for a in (x, y, w)))
        return _local(lp).astype(np.float64), _local(hit)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log-likelihood of each whole document, over lm-eval's disjoint rolling windows."""
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        out = np.zeros(len(requests), np.float64)
        for r, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            out[r] += lp
        return [float(v) for v in out]

    # ---- generation ------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each (context, gen_kwargs) continued until a stop string, EOS or max_gen_toks; requests with
        the same gen_kwargs run together, longest first, ``batch_size`` at a time."""
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, kw) in enumerate(args):
            groups.setdefault(repr(sorted((k, repr(v)) for k, v in kw.items())), []).append(i)
        out: list[str] = [""] * len(args)
        bar = tqdm(total=len(args), desc="generate_until (parscale-jax)", disable=disable_tqdm)
        for idx in groups.values():
            kw = normalize_gen_kwargs(args[idx[0]][1], self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=None)
            max_gen = int(kw.pop("max_gen_toks"))
            if max_gen >= self._max_length:
                raise UserError(f"max_gen_toks {max_gen} leaves no room for a context in max_length "
                                f"{self._max_length}: lower max_gen_toks or raise max_length")
            temp = float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0
            sampling = D.Sampling(temp, int(kw.get("top_k") or 0), float(kw.get("top_p") or 1.0))
            prompts = {i: self.tok_encode(args[i][0])[-(self._max_length - max_gen):] or [self.prefix_token_id]
                       for i in idx}
            order = sorted(idx, key=lambda i: (-len(prompts[i]), args[i][0]))
            for b in range(0, len(order), self._batch):
                rows = order[b: b + self._batch]
                toks = self._generate_batch([prompts[i] for i in rows], max_gen, sampling, until)
                for i, t in zip(rows, toks):
                    out[i] = postprocess_generated_text(self.tok_decode(t), until, None)
                bar.update(len(rows))
        bar.close()
        return out

    def _generate_batch(self, prompts: list[list[int]], max_gen: int, sampling: D.Sampling,
                        until: list[str]) -> list[np.ndarray]:
        """New tokens per prompt (process 0; with several processes every one decodes the batch)."""
        n = len(prompts)
        prompts = prompts + [[self.prefix_token_id]] * (self._batch - n)  # fixed batch: fewer compilations
        S = next(k for k in self.buckets if k >= max(len(p) for p in prompts))
        tokens, _ = D.left_pad(prompts, 0, S)
        lengths = np.asarray([len(p) for p in prompts], np.int32)
        if jax.process_count() > 1:
            self._announce(_GENERATE, S, max_gen)
            tokens, lengths = (multihost_utils.broadcast_one_to_all(a) for a in (tokens, lengths))
            multihost_utils.broadcast_one_to_all(np.asarray([sampling.temperature, sampling.top_k, sampling.top_p]))
        return self._decode(tokens, lengths, max_gen, sampling, until, n)

    def _decode(self, tokens, lengths, max_gen, sampling, until, n_real) -> list[np.ndarray]:
        if self._generator is None:
            pad = getattr(self.tok, "pad_id", None)
            self._generator = D.Generator(self.model, self._host_params, self.eot_token_id,
                                          int(self.eot_token_id if pad is None else pad))
        prompts = [row[len(row) - m:].tolist() for row, m in zip(np.asarray(tokens), lengths)]
        got: list[list[int]] = [[] for _ in prompts]

        def on_chunk(chunk: np.ndarray) -> bool:
            for row, t in zip(got, chunk):
                row.extend(int(v) for v in t)
            done = all(self.eot_token_id in row or any(s and s in self.tok_decode(row) for s in until)
                       for row in got[:n_real])
            if jax.process_count() > 1:  # the decision of process 0, so that every process stops together
                done = bool(multihost_utils.broadcast_one_to_all(np.asarray(done)))
            return done

        out = self._generator.generate(prompts, max_gen, sampling, on_chunk=on_chunk, prompt_len=tokens.shape[1])
        return out[:n_real]

    # ---- several processes -----------------------------------------------------------------
    def _announce(self, kind: int, a: int = 0, b: int = 0) -> None:
        multihost_utils.broadcast_one_to_all(np.asarray([kind, a, b], np.int64))

    def serve(self) -> None:
        """The loop of every process but 0: score and decode what process 0 broadcasts, until it
        calls :meth:`close`."""
        while True:
            kind, a, b = (int(v) for v in multihost_utils.broadcast_one_to_all(np.zeros(3, np.int64)))
            if kind == _STOP:
                return
            if kind == _SCORE:
                z = np.zeros((a, b), np.int32)
                self._run_score(z, z, z.astype(np.float32))
            elif kind == _GENERATE:
                tokens = multihost_utils.broadcast_one_to_all(np.zeros((self._batch, a), np.int32))
                lengths = multihost_utils.broadcast_one_to_all(np.zeros(self._batch, np.int32))
                t, k, p = multihost_utils.broadcast_one_to_all(np.zeros(3, np.float64))
                # the same decoding as process 0 (same sampling, seed 0); process 0 decides when it stops
                self._decode(tokens, lengths, b, D.Sampling(float(t), int(k), float(p)), [], 0)

    def close(self) -> None:
        """Process 0: release the serving processes (a no-op with one process)."""
        if jax.process_count() > 1 and jax.process_index() == 0:
            self._announce(_STOP)
