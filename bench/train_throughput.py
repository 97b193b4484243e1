"""Training throughput of P streams at a fixed backbone: step time, tokens/s, MFU, cost vs FLOPs.

    .venv/bin/python bench/train_throughput.py           # tiny + a larger CPU backbone, P in 1 2 4 8
    .venv/bin/python bench/train_throughput.py --quick   # smoke run (tiny only, 2 timed steps)

For each backbone and P, the jit-compiled train step of the project (``train_step.make_train_step``
with ``optim.make_optimizer``, float32) runs on a fixed random batch. All (backbone, P) steps are
compiled and warmed up first; then the timed steps go round-robin over the configurations
(one step of each, repeated ``--repeats`` times), so every P sees the same machine load; the
median is reported. MFU = model FLOPs (``flops.train_flops_per_token``) x tokens/s over the
peak; on CPU the peak is the measured float32 matmul rate (``flops.measured_matmul_peak``,
best of several measurements taken before, between and after the steps), printed alongside.
The cost ratio of each P is its median step time over P=1's, beside its FLOP ratio.
Writes ``bench/results/train_throughput.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import _common as B  # bench/ is the folder of the running script, so its helpers import directly

from parscale_jax.errors import UserError, cli_entry

BACKBONES = B.BACKBONES


def build(name: str, P: int, batch: int, seq: int, remat: str):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from parscale_jax import model as M
    from parscale_jax import optim as O
    from parscale_jax import train_step as TS
    from parscale_jax.config import preset
    from parscale_jax.train_config import OptimConfig

    cfg = preset("tiny", parscale_n=P, **BACKBONES[name][0])
    model = M.make_model(cfg, "float32", remat=remat)
    tx = O.make_optimizer(OptimConfig(lr=1e-3, warmup_steps=10), 1000)
    state = TS.new_state(M.init_params(model, jax.random.PRNGKey(0)), tx, False, jax.random.PRNGKey(1))
    step = jax.jit(TS.make_train_step(model, tx), donate_argnums=(0,))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, seq + 1)), jnp.int32)
    t0 = time.perf_counter()
    state, m = step(state, tokens)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    box = {"state": state}

    def run():
        box["state"], met = step(box["state"], tokens)
        jax.block_until_ready(met["loss"])

    run()  # warm-up (excluded)
    return cfg, run, compile_s, M.count_params(box["state"]["params"])


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(dict.fromkeys(r["backbone"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        rs = [r for r in rows if r["backbone"] == name]
        x = np.arange(len(rs))
        ax.bar(x - 0.2, [r["flop_ratio"] for r in rs], 0.4, label="FLOP ratio to P=1", color="#9ecae1")
        ax.bar(x + 0.2, [r["cost_ratio"] for r in rs], 0.4, label="step-time ratio to P=1", color="#3182bd")
        for xi, r in zip(x, rs):
            ax.text(xi + 0.2, r["cost_ratio"], f"{r['mfu'] * 100:.0f}%\nMFU", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [r["label"].replace(", ", "\n") for r in rs], fontsize=8)
        ax.set_title(f"{name}: H={rs[0]['hidden_size']}, L={rs[0]['layers']}, {rs[0]['batch']}x{rs[0]['seq_len']} tokens",
                     fontsize=10)
        ax.set_ylabel("x P=1")
        ax.legend(fontsize=8, loc="upper left")
    B.save_figure(fig, path)


@cli_entry
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny only, 2 timed steps")
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    ap.add_argument("--P", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per configuration (median)")
    ap.add_argument("--no-equal-work", dest="equal_work", action="store_false",
                    help="skip the reference row: P=1 at max(P) x the batch (the same stream-tokens)")
    ap.add_argument("--remat", default="none", choices=["none", "full", "save_dots"])
    ap.add_argument("--out", default=B.RESULTS)
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.backbones, args.repeats = ["tiny"], 2
    if 1 not in args.P:
        raise UserError("--P must include 1 (the ratios are to P=1)")
    name = args.name or ("train_throughput_quick" if args.quick else "train_throughput")

    import numpy as np

    from parscale_jax import flops as F

    env0 = B.environment()
    peaks = [F.measured_matmul_peak("float32")]
    B.log(f"measured float32 matmul peak: {peaks[0] / 1e9:.1f} GFLOP/s")
    confs = []
    for bb in args.backbones:
        _, batch, seq = BACKBONES[bb]
        for P in sorted(args.P):
            cfg, run, compile_s, n_params = build(bb, P, batch, seq, args.remat)
            B.log(f"compiled {bb} P={P} in {compile_s:.1f}s")
            confs.append(dict(backbone=bb, P=P, batch=batch, seq_len=seq, cfg=cfg, run=run, compile_s=compile_s,
                              params=n_params, times=[], label=f"P={P}"))
        if args.equal_work and max(args.P) > 1:
            # the same stream-tokens as the largest P without streams: P=1 at P_max x the batch
            Pm = max(args.P)
            cfg, run, compile_s, n_params = build(bb, 1, batch * Pm, seq, args.remat)
            B.log(f"compiled {bb} P=1 at {Pm}x batch in {compile_s:.1f}s")
            confs.append(dict(backbone=bb, P=1, batch=batch * Pm, seq_len=seq, cfg=cfg, run=run, compile_s=compile_s,
                              params=n_params, times=[], label=f"P=1, {Pm}x batch"))
    peaks.append(F.measured_matmul_peak("float32"))
    for i in range(args.repeats):  # round-robin: every configuration under the same load
        for c in confs:
            t = time.perf_counter()
            c["run"]()
            c["times"].append(time.perf_counter() - t)
        if i == args.repeats // 2:
            peaks.append(F.measured_matmul_peak("float32"))
        B.log(f"round {i + 1}/{args.repeats}: " + ", ".join(f"{c['backbone']}/P{c['P']} {c['times'][-1] * 1e3:.0f}ms"
                                                          for c in confs))
    peaks.append(F.measured_matmul_peak("float32"))
    peak = max(peaks)

    rows = []
    for c in confs:
        cfg, tokens = c["cfg"], c["batch"] * c["seq_len"]
        med = float(np.median(c["times"]))
        flops_step = F.train_flops_per_token(cfg, c["seq_len"]) * tokens
        base = next(b for b in confs if b["backbone"] == c["backbone"] and b["label"] == "P=1")
        base_med = float(np.median(base["times"]))
        base_flops = F.train_flops_per_token(base["cfg"], base["seq_len"]) * base["batch"] * base["seq_len"]
        rows.append(dict(backbone=c["backbone"], P=c["P"], label=c["label"], hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, layers=cfg.num_hidden_layers,
                         heads=f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}", prefix_tokens=cfg.prefix_len,
                         batch=c["batch"], seq_len=c["seq_len"], params=c["params"],
                         step_s_median=med, step_s_min=min(c["times"]), step_s_all=c["times"],
                         tokens_per_s=tokens / med, model_flops_per_step=flops_step,
                         achieved_flops=flops_step / med, mfu=flops_step / med / peak,
                         cost_ratio=med / base_med, flop_ratio=flops_step / base_flops,
                         cost_over_flops=(med / base_med) / (flops_step / base_flops), compile_s=c["compile_s"]))

    header = ["backbone", "P", "params", "step ms (median)", "tokens/s", "GFLOP/s", "MFU", "cost x P=1",
              "FLOPs x P=1", "cost / FLOP ratio"]
    table = [[r["backbone"], r["label"], f"{r['params']:,}", f"{r['step_s_median'] * 1e3:.1f}", f"{r['tokens_per_s']:,.0f}",
              f"{r['achieved_flops'] / 1e9:.2f}", f"{r['mfu'] * 100:.1f}%", f"{r['cost_ratio']:.2f}",
              f"{r['flop_ratio']:.2f}", f"{r['cost_over_flops']:.2f}"] for r in rows]
    shapes = "; ".join(
        f"{bb}: H={r['hidden_size']}, I={r['intermediate_size']}, L={r['layers']}, heads {r['heads']}, "
        f"T={BACKBONES[bb][0].get('parscale_n_tokens', 16)} prefix tokens, batch {r['batch']} x {r['seq_len']} tokens"
        for bb in args.backbones for r in rows if r["backbone"] == bb and r["label"] == "P=1")
    p8 = {r["backbone"]: r for r in rows if r["P"] == 8 and r["label"] == "P=8"}
    ew = {r["backbone"]: r for r in rows if r["label"] != f"P={r['P']}"}
    tiny_mfu = [r["mfu"] for r in rows if r["backbone"] == "tiny" and r["label"] == f"P={r['P']}"]
    goals = []
    for bb, r in p8.items():
        goals.append(f"- P=8 step <= 8x P=1 ({bb}): **{'met' if r['cost_ratio'] <= 8 else 'NOT met'}**, "
                     f"{r['cost_ratio']:.2f}x (FLOP ratio {r['flop_ratio']:.2f}x: "
                     f"{'no worse' if r['cost_ratio'] <= r['flop_ratio'] else 'worse'} than its FLOPs)")
    for bb, r in ew.items():
        if bb in p8:
            goals.append(f"- reference ({bb}): {r['label']} (the same stream-tokens as P=8, no prefix, no gate) "
                         f"costs {r['cost_ratio']:.2f}x P=1, so the P=8 step is {p8[bb]['step_s_median'] / r['step_s_median']:.2f}x "
                         f"that equal-work dense step")
    if tiny_mfu:
        goals.append(f"- tiny configs >= 30% of the measured matmul peak: **{'met' if min(tiny_mfu) >= 0.3 else 'NOT met'}**, "
                     f"MFU {min(tiny_mfu) * 100:.1f}%-{max(tiny_mfu) * 100:.1f}%")
    md = [f"Peak: measured float32 matmul rate (jit 1024x1024 matmul, best of {len(peaks)} measurements of 5): "
          f"**{peak / 1e9:.1f} GFLOP/s** (each: {', '.join(f'{p / 1e9:.1f}' for p in peaks)}).",
          f"Shapes: {shapes}. float32, remat={args.remat}; median of {args.repeats} steps after a warm-up step, "
          f"timed round-robin over all configurations.",
          B.md_table(header, table), "Goals:\n" + "\n".join(goals), f"![throughput]({name}.png)"]
    os.makedirs(args.out, exist_ok=True)
    plot(rows, os.path.join(args.out, f"{name}.png"))
    env = B.environment()
    env["load_average_at_start"] = env0["load_average_1_5_15"]
    B.write_results(name, {"rows": rows, "peak_flops": peak, "peak_measurements": peaks,
                           "settings": {"backbones": {b: BACKBONES[b] for b in args.backbones}, "P": args.P,
                                        "repeats": args.repeats, "remat": args.remat, "dtype": "float32"},
                           "env": env},
                    "\n\n".join(md), "Training throughput: P streams at a fixed backbone (CPU)", args.out)
    print("\n\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
