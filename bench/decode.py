"""Decoding cost of P streams vs parameter scaling, measured: per-token latency and memory.

    .venv/bin/python bench/decode.py            # batch 1..64 x (P in 1 2 4 8, and the dense model of P=8's loss)
    .venv/bin/python bench/decode.py --quick    # smoke run (a small backbone, batch 1 2, P in 1 2)
    .venv/bin/python bench/decode.py --floor    # paper-0.5b backbone at batch 1: x a matmul chain, x memory floor

The paper's inference-cost comparison, measured instead of modelled. One backbone (float32,
byte vocabulary) at P in {1, 2, 4, 8}, and a dense P=1 model that the parallel scaling law
predicts to have the same loss as P=8: the law fitted on the paper's Stack-V2-Python losses
(``scaling.fit_dataset``) gives N_eq = N_P8 (k ln 8 + 1); ``scaling.dense_shape_for_params``
scales hidden, MLP and head widths to reach it, rounded to whole (even) head dims.

Each batch size runs in a fresh child process. For each model in turn it compiles the project's
jit prefill and compiled decode loop (``decode.make_prefill`` / ``decode.make_decode_chunk``,
greedy) ahead of time from shapes, then allocates params and the KV cache (``model.init_cache``),
prefills a 64-token prompt (timed, once) and runs one chunk of ``--chunk`` decode steps (warm-up,
and the memory measurement). Then the timed decode chunks go round-robin over the models
(``--repeats`` rounds), so all models of a batch see the same machine load; medians are reported,
per-token latency = chunk time / chunk, each chunk starting from the cache after the prompt
(position 64). Memory, three ways:

* analytic: params bytes + KV cache bytes, from the array sizes (float32);
* XLA: the compiled decode chunk's argument + output + temp buffers (``memory_analysis``);
* measured: the child's peak resident set size while allocating and running that model (``VmHWM``
  reset through ``/proc/self/clear_refs`` after compilation and ``malloc_trim``) minus its RSS
  before: includes allocator slack and XLA's temporaries; noisier than the other two.

Generate-call latency for the cost model = prefill + 63 x per-token latency (64 in + 64 out
tokens). The records go to ``scaling cost --measured`` (with the measured CPU peak and memory
bandwidth) and to ``scaling.inference_cost`` with float32 byte sizes.
Writes ``bench/results/decode.{json,md,png}`` and ``decode_measured.json`` (the cost records).

``--floor`` measures where ParScale's latency claim applies: the paper-0.5b backbone (2.0 GiB of
float32 weights, far beyond the CPU caches) with a 384-token vocabulary, decoding at batch 1
(P = 1, 2, 4, 8), P=1 at batch 8 (the rows of P=8), and the scanned, stacked layer layout. Beside
them, in the same round-robin, a plain jitted chain of ``x @ W`` over the same weight arrays, on 1
row and on 8 rows (what the matmuls alone need for P=8's rows); and the memory floor of each
row: (params + KV cache bytes) / read bandwidth. One process; writes
``bench/results/decode_floor.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import _common as B  # bench/ is the folder of the running script, so its helpers import directly

from parscale_jax.errors import UserError, cli_entry
from parscale_jax.fileio import write_json

BASE = dict(vocab_size=384, hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
            num_key_value_heads=2, parscale_n_tokens=48, max_position_embeddings=1024, tie_word_embeddings=True)
QUICK_BASE = dict(BASE, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4)
PROMPT, NEW = 64, 64


# ---- child: one (model, batch) -------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def child(spec: dict) -> list[dict]:
    """All models at one batch size: memory one model at a time, then latency round-robin."""
    import gc

    import jax
    import jax.numpy as jnp
    import numpy as np

    from parscale_jax import decode as D
    from parscale_jax import model as M
    from parscale_jax.config import ModelConfig

    batch, chunk, repeats = spec["batch"], spec["chunk"], spec["repeats"]
    max_len = PROMPT + chunk + 1
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 256, (batch, PROMPT)), jnp.int32)
    mask = jnp.ones((batch, PROMPT), bool)
    sampling = D.Sampling().astuple()
    key, eos = jax.random.PRNGKey(0), jnp.int32(-1)
    done = jnp.zeros((batch,), bool)
    vec = lambda dt: jax.ShapeDtypeStruct((batch,), dt)  # noqa: E731
    out = []
    for m in spec["models"]:
        cfg = ModelConfig.from_dict(m["cfg"])
        model = M.make_model(cfg, "float32")
        aparams = M.abstract_params(model)
        acache = jax.eval_shape(lambda p: M.init_cache(model, p, batch, max_len), aparams)
        t0 = time.perf_counter()
        prefill = D.make_prefill(model).lower(aparams, acache, jax.ShapeDtypeStruct((batch, PROMPT), jnp.int32),
                                              jax.ShapeDtypeStruct((batch, PROMPT), jnp.bool_)).compile()
        chunk_fn = D.make_decode_chunk(model, 256, chunk).lower(
            aparams, acache, vec(jnp.int32), vec(jnp.bool_), jax.ShapeDtypeStruct((2,), jnp.uint32),
            jax.ShapeDtypeStruct((), jnp.int32), sampling, jax.ShapeDtypeStruct((), jnp.int32)).compile()
        init_cache = jax.jit(lambda p: M.init_cache(model, p, batch, max_len)).lower(aparams).compile()
        init_params = jax.jit(lambda r: M.init_params(model, r)).lower(jax.random.PRNGKey(0)).compile()
        compile_s = time.perf_counter() - t0
        mem = chunk_fn.memory_analysis()
        xla_bytes = None if mem is None else int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                                 + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
        # memory of this model alone: the models measured before it are alive but idle
        gc.collect()
        _malloc_trim()
        rss0 = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            hwm_ok = True
        except OSError:
            hwm_ok = False
        params = init_params(jax.random.PRNGKey(0))
        cache0 = init_cache(params)
        jax.block_until_ready((params, cache0))
        t = time.perf_counter()
        logits, cache = prefill(params, cache0, tokens, mask)
        jax.block_until_ready(logits)
        prefill_s = time.perf_counter() - t
        del cache0
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        # the chunk consumes (donates) cache, token and done: each call feeds the last call's
        # (past the cache's end the writes clamp to its last slot: the same work per step)
        state = chunk_fn(params, cache, token, jnp.zeros_like(done), key, jnp.int32(1), sampling, eos)[1:]
        jax.block_until_ready(state)
        cache = state[0]
        peak_kb = _status_kb("VmHWM") if hwm_ok else None
        p_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
        kv_bytes = cache["k"].nbytes + cache["v"].nbytes
        out.append(dict(name=m["name"], compile_s=compile_s, params_bytes=int(p_bytes),
                        kv_cache_bytes_allocated=int(kv_bytes),
                        kv_cache_bytes_128=int(kv_bytes // (cfg.prefix_len + max_len) * (cfg.prefix_len + PROMPT + NEW)),
                        xla_decode_bytes=xla_bytes,
                        rss_delta_bytes=(peak_kb - rss0) * 1024 if peak_kb is not None else None,
                        params=M.count_params(params), non_embedding=M.count_params(params, non_embedding=True),
                        prefill_s=prefill_s, _run=[chunk_fn, params, state], chunk_times=[]))
        out[-1]["analytic_bytes"] = out[-1]["params_bytes"] + out[-1]["kv_cache_bytes_128"]
    for _ in range(repeats):  # round-robin: every model under the same load
        for r in out:
            chunk_fn, params, state = r["_run"]
            t = time.perf_counter()
            r["_run"][2] = jax.block_until_ready(chunk_fn(params, *state, key, jnp.int32(1), sampling, eos)[1:])
            r["chunk_times"].append(time.perf_counter() - t)
    for r in out:
        del r["_run"]
        r["per_token_s"] = float(np.median(r["chunk_times"])) / chunk
        r["per_token_s_all"] = [x / chunk for x in r["chunk_times"]]
        r["generate_s"] = r["prefill_s"] + (NEW - 1) * r["per_token_s"]
    return out


def run_child(spec: dict, timeout: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=B.ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"child for batch {spec['batch']} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- --floor: batch-1 decoding where it is bound by reading the weights ------------------------
FLOOR_PRESET = "paper-0.5b"  # 36 layers, H=896, I=4864, 16/2 heads: 2.0 GiB of float32 weights


def chain_program(layers: list[dict], rows: int, chunk: int):
    """jit: ``chunk`` steps of a plain matmul chain over the decoder's weights (the same arrays,
    passed as arguments): per layer x @ Wq, x @ Wk, x @ Wv, (x @ Wq) @ Wo, x @ Wgate, x @ Wup,
    (silu * up) @ Wdown on ``rows`` rows, each layer's output feeding the next (with an RMS
    normalisation). Returns the timed call."""
    import jax
    import jax.numpy as jnp

    weights = [{"q": p["attn"]["q"]["kernel"], "k": p["attn"]["k"]["kernel"], "v": p["attn"]["v"]["kernel"],
                "o": p["attn"]["o"]["kernel"], "gate": p["mlp"]["gate"]["kernel"], "up": p["mlp"]["up"]["kernel"],
                "down": p["mlp"]["down"]["kernel"]} for p in layers]

    def step(ws, x):
        for w in ws:
            H = x.shape[-1]
            q = x @ w["q"].reshape(H, -1)
            k, v = x @ w["k"].reshape(H, -1), x @ w["v"].reshape(H, -1)
            x = x + q @ w["o"].reshape(-1, H) + jnp.sum(k) + jnp.sum(v)
            x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
            x = x + (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
            x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        return x

    @jax.jit
    def run(ws, x):
        return jax.lax.scan(lambda x, _: (step(ws, x), x[:, 0]), x, None, length=chunk)

    x = jnp.ones((rows, weights[0]["gate"].shape[0]), jnp.float32)
    return lambda: jax.block_until_ready(run(weights, x))


def floor_setup(P: int, batch: int, layout: str, base: dict, chunk: int):
    """The project's decode chunk for the floor backbone at P streams and ``batch`` rows, after a
    prefilled prompt: (timed call, bytes of params + KV cache). ``base`` holds the shared arrays:
    the stacked params at the largest P and, for the generator's layout, its per-layer copy
    (:func:`decode.decoding_layout`); prefix and gate of another P are initialised fresh."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from parscale_jax import decode as D
    from parscale_jax import model as M
    from parscale_jax.config import preset

    model = M.make_model(preset(FLOOR_PRESET, vocab_size=384, parscale_n=P), "float32")
    params = {"backbone": base["per_layer" if layout == "generator" else "stacked"]["backbone"]}
    if P == base["P"]:
        params.update({g: a for g, a in base["stacked"].items() if g != "backbone"})
    elif P > 1:  # the small groups only (a backbone is allocated and dropped)
        params.update({g: a for g, a in M.init_params(model, jax.random.PRNGKey(P)).items() if g != "backbone"})
    if layout == "generator":
        model, params = D.decoding_layout(model, params)  # params are per-layer already: no copy
    max_len = PROMPT + chunk + 1
    cache = jax.jit(lambda p: M.init_cache(model, p, batch, max_len))(params)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, PROMPT)), jnp.int32)
    logits, cache = D.make_prefill(model)(params, cache, prompt, jnp.ones(prompt.shape, bool))
    state = [cache, jnp.argmax(logits, -1).astype(jnp.int32), jnp.zeros((batch,), bool)]
    rest = (jax.random.PRNGKey(0), jnp.int32(1), D.Sampling().astuple(), jnp.int32(-1))
    fn = D.make_decode_chunk(model, 256, chunk).lower(params, *state, *rest).compile()
    nbytes = sum(a.nbytes for a in jax.tree.leaves(params)) + cache["k"].nbytes + cache["v"].nbytes

    def call():
        """cache, token and done are donated: each call feeds the last call's (the writes clamp
        at the cache's end: the same work per step)."""
        state[:] = jax.block_until_ready(fn(params, *state, *rest)[1:])

    return call, int(nbytes)


def _floor_layers(base: dict, n_layers: int) -> list[dict]:
    """The decoder's per-layer weight trees (shared with the generator layout when it is measured)."""
    import jax

    if "per_layer" in base:
        dec = base["per_layer"]["backbone"]["decoder"]
        return [dec[f"layers_{i}"] for i in range(n_layers)]
    stacked = base["stacked"]["backbone"]["decoder"]["layers"]
    return [jax.tree.map(lambda a: a[i], stacked) for i in range(n_layers)]


def floor_measure(args) -> tuple[list[dict], float]:
    """Set up every floor row and the matmul chain, time them round-robin; (rows, bandwidth)."""
    import jax
    import numpy as np

    from parscale_jax import model as M
    from parscale_jax.config import preset

    specs = []
    for r in args.floor_rows:  # "PxB" or "PxB:stacked"
        shape, _, layout = r.partition(":")
        P, b = (int(x) for x in shape.split("x"))
        specs.append((P, b, layout or "generator"))
    bw = measure_bandwidth(2 * 2**30)  # about the weights' size, far beyond the caches
    Pmax = max(P for P, _, _ in specs)
    cfg = preset(FLOOR_PRESET, vocab_size=384, parscale_n=Pmax)
    base = {"P": Pmax, "stacked": M.init_params(M.make_model(cfg, "float32"), jax.random.PRNGKey(0))}
    if any(layout == "generator" for _, _, layout in specs):
        base["per_layer"] = M.unstack_layers(base["stacked"])
    runs = []
    for P, b, layout in specs:
        fn, nbytes = floor_setup(P, b, layout, base, args.chunk)
        label = f"P={P}, batch {b}" + (", stacked layers (lax.scan)" if layout == "stacked" else "")
        runs.append(dict(model=label, P=P, batch=b, layout=layout, bytes=nbytes, _fn=fn, times=[]))
        B.log(f"ready: {label} ({nbytes / 2**30:.2f} GiB of params + cache)")
    layers = _floor_layers(base, cfg.num_hidden_layers)
    chain_bytes = sum(int(a.nbytes) for p in layers for n in ("attn", "mlp") for a in jax.tree.leaves(p[n])
                      if a.ndim > 1)
    for rows in (8, 1):  # the 1-row chain last: the reference of the "x chain" column
        runs.append(dict(model=f"matmul chain, {rows} row{'s' * (rows > 1)}", P=None, batch=rows,
                         layout="per-layer arrays", bytes=chain_bytes, _fn=chain_program(layers, rows, args.chunk),
                         times=[]))
    for r in runs:
        r["_fn"]()  # warm-up
    for i in range(args.repeats):  # round-robin: every row under the same load
        for r in runs:
            t = time.perf_counter()
            r["_fn"]()
            r["times"].append((time.perf_counter() - t) / args.chunk)
        B.log(f"round {i + 1}/{args.repeats}")
    for r in runs:
        del r["_fn"]
        r["per_token_s"] = float(np.median(r["times"]))
        r["floor_s"] = r["bytes"] / bw
    return runs, bw


def floor_main(args) -> int:
    """``--floor``: the paper-0.5b backbone (vocabulary 384, float32) decoding at batch 1."""
    env0 = B.environment()
    runs, bw = floor_measure(args)
    by = {(r["P"], r["batch"], r["layout"]): r for r in runs}
    chain = runs[-1]["per_token_s"]
    table = [[r["model"], f"{r['per_token_s'] * 1e3:.1f}", f"{r['per_token_s'] / chain:.2f}",
              f"{r['bytes'] / 2**30:.2f}", f"{r['floor_s'] * 1e3:.1f}", f"{r['per_token_s'] / r['floor_s']:.2f}",
              f"{r['bytes'] / r['per_token_s'] / 1e9:.1f}"] for r in runs]
    goals = []
    p1, p1b8, p8 = (by.get(k) for k in ((1, 1, "generator"), (1, 8, "generator"), (8, 1, "generator")))
    if p1:
        x = p1["per_token_s"] / chain
        goals.append(f"P=1 batch 1 within 1.5x the matmul chain: **{'met' if x <= 1.5 else 'NOT met'}** ({x:.2f}x).")
    if p8 and p1b8:
        x = p8["per_token_s"] / p1b8["per_token_s"]
        goals.append(f"P=8 batch 1 within 1.15x P=1 batch 8 (the same rows): **{'met' if x <= 1.15 else 'NOT met'}** "
                     f"({x:.2f}x).")
    if p8 and p1:
        goals.append(f"P=8 / P=1 at batch 1: **{p8['per_token_s'] / p1['per_token_s']:.2f}x**.")
    md = [f"Backbone `{FLOOR_PRESET}` (36 layers, H=896, I=4864, 16/2 heads, T=48) with a 384-token vocabulary, "
          f"float32; the project's compiled decode chunk ({args.chunk} greedy steps after a {PROMPT}-token prompt; "
          f"the generator's layout unless the row says otherwise), and a plain jitted chain of `x @ W` over the same "
          f"weight arrays (attention and MLP, 1 and 8 rows, {args.chunk} steps per call; 'x chain' is over the "
          f"1-row chain). Median of {args.repeats} rounds, "
          f"round-robin over the rows. Memory floor = bytes of params + KV cache (the chain: its weights) / "
          f"read bandwidth ({bw / 1e9:.1f} GB/s, jit sum over 2 GiB).",
          B.md_table(["decoding", "ms/token", "x chain", "params + cache GiB", "floor ms", "x memory floor",
                      "GB/s"], table),
          "\n".join(f"- {g}" for g in goals)]
    env = B.environment()
    env["load_average_at_start"] = env0["load_average_1_5_15"]
    B.write_results(args.name or "decode_floor", {"rows": runs, "bandwidth": bw, "chunk": args.chunk,
                                                  "repeats": args.repeats, "env": env},
                    "\n\n".join(md), "Batch-1 decoding at the memory floor (CPU)", args.out)
    print("\n\n".join(md))
    return 0


# ---- parent --------------------------------------------------------------------------------
def dense_config(base: dict, n_p: int, k: float, P: int):
    """The dense (P=1) config whose non-embedding count is N_P (k ln P + 1), whole head dims."""
    import math

    from parscale_jax import scaling as SC
    from parscale_jax.config import ModelConfig

    shape = SC.shape_from_mapping(base)
    target = n_p * (k * math.log(P) + 1)
    s = SC.dense_shape_for_params(shape, target)
    hd = int(round(s.head_dim / 2)) * 2
    nH = base["num_attention_heads"]
    inter = int(round(s.intermediate_size / 16)) * 16
    cfg = ModelConfig.from_dict(dict(base, hidden_size=nH * hd, intermediate_size=inter, parscale_n=1))
    return cfg, target, s


def measure_bandwidth(nbytes: int) -> float:
    """Bytes/s of a jit float32 sum over an ``nbytes`` array (best of 5): streaming read bandwidth."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m in models:
        rs = sorted((r for r in rows if r["model"] == m), key=lambda r: r["batch"])
        b = [r["batch"] for r in rs]
        style = "s--" if m.startswith("dense") else "o-"
        axes[0].plot(b, [r["per_token_s"] * 1e3 for r in rs], style, label=m)
        base = {r["batch"]: r for r in rows if r["model"] == "P=1"}
        axes[1].plot(b, [r["per_token_s"] / base[r["batch"]]["per_token_s"] for r in rs], style, label=m)
        axes[2].plot(b, [r["analytic_bytes"] / 2**20 for r in rs], style, label=m)
    for ax, yl, t in zip(axes, ["ms per decode step", "latency x P=1 (same batch)", "MiB (params + KV cache)"],
                         ["per-token decode latency", "relative to P=1", "memory (analytic)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(yl)
        ax.set_title(t, fontsize=10)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[1].axhline(1.3, color="gray", lw=0.8, ls=":")
    axes[0].legend(fontsize=8)
    B.save_figure(fig, path)


@cli_entry
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: a small backbone, batch 1 2, P in 1 2 + dense of P=2's loss")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--P", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--chunk", type=int, default=16, help="decode steps per timed call")
    ap.add_argument("--repeats", type=int, default=5, help="timed decode chunks per config, round-robin (median)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per child (one batch size)")
    ap.add_argument("--out", default=B.RESULTS)
    ap.add_argument("--name", default=None)
    ap.add_argument("--floor", action="store_true",
                    help="batch-1 decoding of the paper-0.5b backbone vs a matmul chain and the memory floor")
    ap.add_argument("--floor-rows", nargs="+", default=["1x1", "1x8", "2x1", "4x1", "8x1", "1x1:stacked"],
                    help="--floor: PxBATCH, ':stacked' for the scanned, stacked layer layout")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.floor:
        return floor_main(args)
    base = dict(BASE)
    if args.quick:
        base, args.batch, args.P, args.chunk, args.repeats = dict(QUICK_BASE), [1, 2], [1, 2], 4, 2
    if 1 not in args.P:
        raise UserError("--P must include 1 (latency and memory increases are over P=1)")
    name = args.name or ("decode_quick" if args.quick else "decode")

    from parscale_jax import flops as F
    from parscale_jax import model as M
    from parscale_jax import scaling as SC
    from parscale_jax.config import ModelConfig

    env0 = B.environment()
    fit = SC.fit_dataset(SC.load_losses(), "stack-v2-python")
    k = fit.constants.k
    Pmax = max(args.P)
    cfg_pmax = ModelConfig.from_dict(dict(base, parscale_n=Pmax))
    n_p8 = M.count_params(M.abstract_params(M.make_model(cfg_pmax)), non_embedding=True)
    dense_cfg, n_target, dense_shape = dense_config(base, n_p8, k, Pmax)
    n_dense = M.count_params(M.abstract_params(M.make_model(dense_cfg)), non_embedding=True)
    models = [(f"P={P}", ModelConfig.from_dict(dict(base, parscale_n=P))) for P in sorted(args.P)]
    models.append((f"dense (P={Pmax} loss)", dense_cfg))
    B.log(f"law (Stack fit): k={k:.4f}; P={Pmax} non-embedding N={n_p8:,} -> dense target {n_target:,.0f}; "
          f"dense model H={dense_cfg.hidden_size} I={dense_cfg.intermediate_size} has N={n_dense:,}")

    peak = F.measured_matmul_peak("float32")
    bw = measure_bandwidth(512 * 2**20)
    B.log(f"measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s, read bandwidth {bw / 1e9:.1f} GB/s (512 MiB array)")

    rows = []
    t_all = time.time()
    for b in sorted(args.batch):
        spec = {"models": [{"name": label, "cfg": cfg.to_dict()} for label, cfg in models], "batch": b,
                "chunk": args.chunk, "repeats": args.repeats}
        for (label, cfg), r in zip(models, run_child(spec, args.timeout)):
            r.update(model=label, P=cfg.parscale_n, batch=b, hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, cfg=cfg.to_dict())
            rows.append(r)
            B.log(f"batch {b:>2} {label:<17} {r['per_token_s'] * 1e3:8.2f} ms/token, prefill {r['prefill_s']:.3f}s, "
                  f"analytic {r['analytic_bytes'] / 2**20:.1f} MiB, RSS delta "
                  f"{(r['rss_delta_bytes'] or 0) / 2**20:.1f} MiB ({time.time() - t_all:.0f}s so far)")

    # the cost model: records for `scaling cost --measured`, and the API with float32 byte sizes
    os.makedirs(args.out, exist_ok=True)
    recs = [{"P": r["P"], "batch": r["batch"], "latency_s": r["generate_s"], "model": r["cfg"],
             "input_tokens": PROMPT, "output_tokens": NEW, "label": r["model"]} for r in rows]
    meas_path = os.path.join(args.out, f"{name}_measured.json")
    write_json(meas_path, recs, indent=1)
    cli = [sys.executable, "-m", "parscale_jax.scaling", "cost", "--measured", os.path.relpath(meas_path, B.ROOT),
           "--peak-flops", f"{peak:.4g}", "--bandwidth", f"{bw:.4g}", "--prefix-mode", "cache",
           "--protocol", "project", "--lengths", str(PROMPT), "--batch", "1", "--P", "8"]
    cp = subprocess.run(cli, capture_output=True, text=True, cwd=B.ROOT)
    cli_out = cp.stdout + (cp.stderr if cp.returncode else "")
    hw = SC.Hardware("this CPU (measured)", peak, bw, 1e12)
    for r in rows:
        c = SC.inference_cost(SC.shape_from_mapping(r["cfg"]), r["P"], r["batch"], hw, input_tokens=PROMPT,
                              output_tokens=NEW, weight_bytes=4, act_bytes=4, kv_bytes=4, prefix_mode="cache")
        r["model_latency_s_f32"] = c["latency_s"]
        r["model_memory_bytes_f32"] = c["memory_bytes"]

    # tables
    by = {(r["model"], r["batch"]): r for r in rows}
    header = ["batch", "model", "ms/token", "x P=1", "prefill s", "generate s (64+64)", "cost model s (f32)",
              "meas/model", "analytic MiB", "XLA decode MiB", "RSS delta MiB"]
    table = []
    for r in rows:
        base_r = by[("P=1", r["batch"])]
        table.append([r["batch"], r["model"], f"{r['per_token_s'] * 1e3:.2f}",
                      f"{r['per_token_s'] / base_r['per_token_s']:.2f}", f"{r['prefill_s']:.3f}",
                      f"{r['generate_s']:.3f}", f"{r['model_latency_s_f32']:.3f}",
                      f"{r['generate_s'] / r['model_latency_s_f32']:.2f}", f"{r['analytic_bytes'] / 2**20:.1f}",
                      B.fmt(r["xla_decode_bytes"] / 2**20 if r["xla_decode_bytes"] else None, 1),
                      B.fmt(r["rss_delta_bytes"] / 2**20 if r["rss_delta_bytes"] is not None else None, 1)])
    cmp_rows, cmp = [], []
    dense_label = models[-1][0]
    pm_label = f"P={Pmax}"
    for b in sorted(args.batch):
        r1, rp, rd = by[("P=1", b)], by[(pm_label, b)], by[(dense_label, b)]
        dl_p, dl_d = rp["per_token_s"] - r1["per_token_s"], rd["per_token_s"] - r1["per_token_s"]
        dm_p, dm_d = rp["analytic_bytes"] - r1["analytic_bytes"], rd["analytic_bytes"] - r1["analytic_bytes"]
        row = dict(batch=b, latency_increase_parscale_s=dl_p, latency_increase_dense_s=dl_d,
                   memory_increase_parscale_bytes=dm_p, memory_increase_dense_bytes=dm_d,
                   latency_ratio=dl_d / dl_p if dl_p > 0 else None, memory_ratio=dm_d / dm_p if dm_p > 0 else None)
        cmp.append(row)
        cmp_rows.append([b, f"{dl_p * 1e3:+.2f}", f"{dl_d * 1e3:+.2f}",
                         B.fmt(row["latency_ratio"], 2) if row["latency_ratio"] is not None else "— (no increase)",
                         f"{dm_p / 2**20:+.1f}", f"{dm_d / 2**20:+.1f}", B.fmt(row["memory_ratio"], 1)])
    b1 = by[(pm_label, min(args.batch))]["per_token_s"] / by[("P=1", min(args.batch))]["per_token_s"]
    shape_txt = (f"backbone H={base['hidden_size']}, I={base['intermediate_size']}, L={base['num_hidden_layers']}, "
                 f"heads {base['num_attention_heads']}/{base['num_key_value_heads']}, T={base['parscale_n_tokens']} "
                 f"prefix tokens, vocabulary {base['vocab_size']} (tied), float32")
    md = [f"Models: {shape_txt}; P=1 has {by[('P=1', args.batch[0])]['non_embedding']:,} non-embedding params, "
          f"P={Pmax} {n_p8:,}. Dense model of P={Pmax}'s predicted loss (Stack-V2-Python fit, k={k:.4f}): target N = "
          f"{n_target:,.0f} -> H={dense_cfg.hidden_size}, I={dense_cfg.intermediate_size} (same layers/heads/vocabulary), "
          f"N = {n_dense:,} ({(n_dense / n_target - 1) * 100:+.1f}% after rounding to whole head dims).",
          f"Per-token latency: median of {args.repeats} chunks of {args.chunk} greedy decode steps at cache position "
          f"{PROMPT} (after a {PROMPT}-token prompt), timed round-robin over the models; prefill timed once; one child process per batch size. CPU peak (measured "
          f"float32 matmul) {peak / 1e9:.1f} GFLOP/s, read bandwidth (jit sum over 512 MiB) {bw / 1e9:.1f} GB/s.",
          B.md_table(header, table),
          "Memory columns: *analytic* = params + KV cache for 64 + 64 tokens (T prefix slots per stream included), "
          "from array sizes; *XLA decode* = the compiled decode chunk's argument + output + temp buffers "
          "(allocated cache of 64 + chunk + 1 slots); *RSS delta* = measured peak RSS of the child while "
          "allocating and running that model minus its RSS before (allocator and XLA temporaries included).",
          f"### ParScale P={Pmax} vs parameter scaling (the paper's comparison, measured)\n\n" + B.md_table(
              ["batch", f"latency increase P={Pmax} (ms/token)", "latency increase dense (ms/token)", "x less latency increase",
               f"memory increase P={Pmax} (MiB)", "memory increase dense (MiB)", "x less memory increase"], cmp_rows),
          f"Goal 'batch-1 decode at P={Pmax} within 1.3x of P=1': **{'met' if b1 <= 1.3 else 'NOT met'}** ({b1:.2f}x).",
          "### Cost model vs measurement\n\n`cost model s (f32)` above is `scaling.inference_cost(..., "
          "weight_bytes=4, act_bytes=4, kv_bytes=4, prefix_mode='cache')` on this CPU's measured peak and "
          "bandwidth (70% / 90% efficiencies). The same records through the CLI (which assumes 2-byte bf16 "
          "weights, so its modelled latencies are lower for a float32 run):\n\n"
          f"```\n$ {' '.join(['python'] + cli[1:])}\n{cli_out.strip()}\n```",
          f"![decode]({name}.png)"]
    plot(rows, os.path.join(args.out, f"{name}.png"))
    env = B.environment()
    env["load_average_at_start"] = env0["load_average_1_5_15"]
    B.write_results(name, {"rows": rows, "comparison": cmp, "peak_flops": peak, "bandwidth": bw,
                           "law": fit.to_dict(), "P_max": Pmax, "n_pmax": n_p8, "n_dense_target": n_target, "n_dense": n_dense,
                           "dense_cfg": dense_cfg.to_dict(), "goal_batch1_ratio": b1,
                           "cost_cli": {"command": " ".join(["python"] + cli[1:]), "output": cli_out},
                           "settings": {"batch": args.batch, "P": args.P, "chunk": args.chunk,
                                        "repeats": args.repeats, "base": base},
                           "env": env},
                    "\n\n".join(md), "Decoding: P streams vs a dense model of equal predicted loss (CPU)", args.out)
    print("\n\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
