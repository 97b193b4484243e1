"""One command for the day a GPU is lent: train, compare attention and decode on one NVIDIA GPU.

    .venv/bin/python bench/gpu_check.py              # one GPU: paper-0.5b and paper-1.6b, P = 1 and 8
    .venv/bin/python bench/gpu_check.py --dry-run    # the same code on the CPU, tiny model (make test)

For each backbone and P, on one device, in bf16 with remat=full (the configs' settings):

* training: train.py's step (:func:`train_step.build`), compiled ahead of time, so XLA's
  prediction of its memory (``memory_analysis``) is known; ``--steps`` steps on random tokens
  after one warm-up step: tokens/s, MFU (model FLOPs of :mod:`parscale_jax.flops` over the
  device's bf16 peak from :mod:`parscale_jax.hardware`), the loss, and the device's peak
  memory (``memory_stats``) against the compiled total;
* attention: the loss of one batch with ``cudnn`` attention and with ``chunked`` on the same
  params (relative difference; cuDNN runs bf16 inputs with float32 accumulation);
* decoding: batch-1 ms/token of the generator's compiled decode program
  (:func:`decode.make_decode_chunk`, 16 steps a call, a cache of ``seq`` tokens), after a
  warm-up.

On the CPU (``--dry-run``) the model is the tiny preset and ``cudnn`` is ``cudnn_xla`` (the
cuDNN path of parscale_jax.attention around JAX's XLA implementation of the same call), so the
script runs end to end in ``make test`` (tests/test_gpu_check.py) and cannot rot. Budget on a
GPU: under 8 minutes (the ``device`` tool lends 15). Writes ``bench/results/gpu_check.{json,md}``
(``gpu_check_quick`` for a dry run, not kept).
"""
from __future__ import annotations

import argparse
import sys
import time

import _common as B  # bench/ is the folder of the running script, so its helpers import directly

GiB = 2 ** 30


def config(model: str, P: int, seq: int, batch: int, dry: bool):
    from parscale_jax import train_config

    over = [f"model.parscale_n={P}", f"data.seq_len={seq}", f"batch_size={batch}", "mesh.data=1",
            "dtype=bfloat16", "remat=full"]
    if dry:
        return train_config.load("configs/tiny.yaml", over + ["model.attention_impl=cudnn_xla"])
    return train_config.load(f"configs/{model}.yaml", over + ["model.attention_impl=cudnn"])


def train(cfg, steps: int) -> tuple[dict, object, dict]:
    """Compile train.py's step for one device, run it; (row, model, params)."""
    import jax
    import numpy as np

    from parscale_jax import flops as F
    from parscale_jax import model as M
    from parscale_jax import sharding as S
    from parscale_jax import train_step as TS

    mesh = S.make_mesh(cfg.mesh, jax.devices()[:1])
    prog = TS.build(cfg, mesh)
    tokens = jax.device_put(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (
        cfg.batch_size, cfg.data.seq_len + 1)).astype(np.int32), prog.batch_sharding)
    with S.activate(mesh):
        t0 = time.perf_counter()
        compiled = prog.step.lower(prog.abstract_state, tokens).compile()
        compile_s = time.perf_counter() - t0
        init = jax.jit(lambda r: TS.new_state(M.init_params(prog.model, r), prog.tx, cfg.freeze_backbone, r),
                       out_shardings=prog.state_shardings)
        state = init(jax.random.PRNGKey(0))
        state, m = compiled(state, tokens)  # warm-up
        jax.block_until_ready(m["loss"])
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = compiled(state, tokens)
        loss = float(m["loss"])
        dt = (time.perf_counter() - t0) / steps
    mem = compiled.memory_analysis()
    predicted = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                 + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    stats = jax.devices()[0].memory_stats() or {}
    tok_s = cfg.batch_size * cfg.data.seq_len / dt
    peak, src = F.device_peak_flops()
    row = {"P": cfg.model.parscale_n, "attention_impl": prog.model.cfg.attention_impl, "batch": cfg.batch_size,
           "seq": cfg.data.seq_len, "compile_s": compile_s, "step_s": dt, "tokens_per_s": tok_s,
           "mfu": F.train_flops_per_token(cfg.model, cfg.data.seq_len) * tok_s / peak, "peak_flops": peak,
           "peak_source": src, "loss": loss, "predicted_bytes": int(predicted),
           "peak_bytes_in_use": stats.get("peak_bytes_in_use")}
    return row, prog.model, TS.full_params(state)


def attention_agreement(cfg, params) -> dict:
    """Loss of one batch with the cuDNN path and with chunked attention, same params."""
    import jax
    import numpy as np

    from parscale_jax import model as M
    from parscale_jax.loss import sequence_nll

    tokens = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (1, cfg.data.seq_len + 1)).astype(np.int32)
    out = {}
    for impl in (cfg.model.attention_impl, "chunked"):
        model = M.make_model(cfg.model.replace(attention_impl=impl), cfg.dtype)
        nll = jax.jit(lambda p, t, model=model: sequence_nll(model, p, t))(params, tokens)
        out[impl] = np.asarray(nll, np.float64)
    a, b = out.values()
    return {"loss_cudnn": float(a.mean()), "loss_chunked": float(b.mean()),
            "max_rel_diff": float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6)))}


def decode_ms(model, params, max_len: int, chunk: int = 16, chunks: int = 4) -> float:
    """Batch-1 decoding ms/token: the generator's compiled decode program (``chunk`` steps per
    call, a cache of ``max_len`` tokens), timed over ``chunks`` calls after a warm-up call."""
    import jax
    import jax.numpy as jnp

    from parscale_jax import decode
    from parscale_jax import model as M

    model, params = decode.decoding_layout(model, params)
    step = decode.make_decode_chunk(model, pad_id=0, chunk=chunk)
    cache = jax.jit(lambda p: M.init_cache(model, p, 1, max_len))(params)
    token, done, key = jnp.ones((1,), jnp.int32), jnp.zeros((1,), bool), jax.random.PRNGKey(0)
    st, eos = decode.Sampling().astuple(), jnp.int32(-1)
    for i in range(chunks + 2):  # two warm-up calls: the second sees the types the program returns
        if i == 2:
            jax.block_until_ready(token)
            t0 = time.perf_counter()
        _, cache, token, done = step(params, cache, token, done, key, jnp.int32(i * chunk), st, eos)
    jax.block_until_ready(token)
    return 1000 * (time.perf_counter() - t0) / (chunks * chunk)


def markdown(rows: list[dict]) -> str:
    head = ["model", "P", "attention", "batch x seq", "tokens/s", "MFU", "loss", "peak memory", "compiled prediction",
            "cuDNN vs chunked (max rel. loss diff)", "decode ms/token (batch 1)"]
    g = lambda x: "n/a (no memory_stats)" if x is None else f"{x / GiB:.2f} GiB"  # noqa: E731
    body = [[r["model"], r["P"], r["attention_impl"], f"{r['batch']} x {r['seq']}", f"{r['tokens_per_s']:,.0f}",
             f"{r['mfu']:.1%}", f"{r['loss']:.3f}", g(r["peak_bytes_in_use"]), g(r["predicted_bytes"]),
             f"{r['attention']['max_rel_diff']:.2e}", f"{r['decode_ms_per_token']:.2f}"] for r in rows]
    return B.md_table(head, body, "llllrrrrrrr")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="on the CPU: the tiny model, cudnn_xla attention")
    ap.add_argument("--models", nargs="+", default=["paper-0.5b", "paper-1.6b"])
    ap.add_argument("--P", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--seq", type=int, default=None, help="default 2048 (dry run: 32)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; dry run: 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5; dry run: 1)")
    ap.add_argument("--out", default=B.RESULTS, help="results folder")
    a = ap.parse_args(argv)
    import jax

    if not a.dry_run and jax.default_backend() != "gpu":
        print(f"error: no GPU here (jax sees {jax.default_backend()}): run on a GPU host, or use --dry-run",
              file=sys.stderr)
        return 2
    models = ["tiny"] if a.dry_run else a.models
    seq, batch = a.seq or (32 if a.dry_run else 2048), a.batch or (2 if a.dry_run else 4)
    steps = a.steps or (1 if a.dry_run else 5)
    rows, t_start = [], time.perf_counter()
    for name in models:
        for P in a.P:
            cfg = config(name, P, seq, batch, a.dry_run)
            B.log(f"{name} P={P}: compiling and training {steps} steps ...")
            row, model, params = train(cfg, steps)
            row["model"], row["attention"] = name, attention_agreement(cfg, params)
            row["decode_ms_per_token"] = decode_ms(model, params, max_len=seq, chunk=8 if a.dry_run else 16)
            del params
            B.log(f"  {row['tokens_per_s']:,.0f} tokens/s, MFU {row['mfu']:.1%}, cuDNN vs chunked "
                  f"{row['attention']['max_rel_diff']:.1e}, decode {row['decode_ms_per_token']:.2f} ms/token "
                  f"({time.perf_counter() - t_start:.0f} s so far)")
            rows.append(row)
    name = "gpu_check_quick" if a.dry_run else "gpu_check"
    B.write_results(name, {"rows": rows, "wall_s": time.perf_counter() - t_start}, markdown(rows),
                    "One GPU: training, cuDNN vs chunked attention, decoding", out_dir=a.out)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
