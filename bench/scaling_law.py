"""A small parallel scaling law on real data: backbone sizes x P, the same tokens each.

    .venv/bin/python bench/scaling_law.py            # the CPU grid (3 sizes x P in 1,2,4,8; ~30-40 min on 2 cores)
    .venv/bin/python bench/scaling_law.py --quick    # smoke run (2 sizes x P in 1,2; a few steps)

Every run is ``parscale_jax.runner.train`` on ``configs/tiny.yaml`` (the default corpus: this
interpreter's standard library, byte tokenizer, seq_len 128) with only the backbone size and P
changed: same seed, same data order, same number of steps and batch, so the same training
tokens. Held-out loss is the runner's final evaluation on the held-out split (the same windows
for every run). The parallel law ``L = E + (A*1e9 / (N (k ln P + 1)))^alpha`` is fitted with
``parscale_jax.scaling.fit_law`` (N = non-embedding parameters, prefix and aggregator included,
as in the paper's counts). Writes ``bench/results/scaling_law.{json,md,png}``.

Finished runs are reused (``<workdir>/<run>/bench_run.json``), so an interrupted grid resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import _common as B  # bench/ is the folder of the running script, so its helpers import directly

from parscale_jax.errors import UserError, cli_entry
from parscale_jax.fileio import write_json

# (hidden, intermediate, layers); heads stay at the tiny preset's 4 query / 2 KV heads
DEFAULT_SIZES = "32x80x2,64x160x2,128x320x2"


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in text.split(","):
        try:
            h, i, l = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise UserError(f"--sizes item {item!r} is not HIDDENxINTERMEDIATExLAYERS: write e.g. 64x160x2") from None
        if h % 4 or (h // 4) % 2:
            raise UserError(f"--sizes hidden {h} must be a multiple of 8 (4 heads with an even head dim)")
        out.append((h, i, l))
    return out


def run_one(args, H: int, I: int, L: int, P: int) -> dict:
    from parscale_jax import model as M
    from parscale_jax import train_config

    name = f"H{H}_I{I}_L{L}_P{P}"
    wd = os.path.join(args.workdir, name)
    done = os.path.join(wd, "bench_run.json")
    over = [f"model.parscale_n={P}", f"model.hidden_size={H}", f"model.intermediate_size={I}",
            f"model.num_hidden_layers={L}", f"steps={args.steps}", f"batch_size={args.batch_size}",
            f"eval_windows={args.eval_windows}", "eval_every=0", "eval_batch_size=32",
            f"checkpoint.every={args.steps}", f"log_every={max(1, args.steps // 5)}", *args.overrides]
    cfg = train_config.load(args.config, over)
    if os.path.exists(done):
        with open(done) as f:
            rec = json.load(f)
        if rec.get("overrides") == over:
            B.log(f"== {name}: reusing {done}")
            return rec
    B.log(f"== {name}: {cfg.steps} steps x {cfg.batch_size} x {cfg.data.seq_len} tokens -> {wd}")
    s, params, wall = B.train_fresh(cfg, wd, args.verbose)
    rec = {"run": name, "H": H, "I": I, "L": L, "P": P, "overrides": over,
           "params": M.count_params(params),
           "non_embedding": M.count_params(params, non_embedding=True),
           "backbone_non_embedding": M.count_params({"backbone": params["backbone"]}, non_embedding=True),
           "eval_loss": s["eval_loss"], "eval_bpb": s.get("eval_bpb"), "eval_tokens": s.get("eval_tokens"),
           "train_tokens": cfg.steps * cfg.batch_size * cfg.data.seq_len,
           "final_train_loss": s["losses"][-1][1] if s.get("losses") else None,
           "tokens_per_s": s.get("tokens_per_s"), "compile_s": s.get("compile_s"), "wall_s": wall}
    write_json(done, rec, indent=1)  # atomic: a run's "done" record is whole or absent
    B.log(f"   {name}: held-out loss {rec['eval_loss']:.4f}, {wall:.0f}s")
    return rec


def plot(rows, fit, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from parscale_jax import scaling as SC

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    Ps = sorted({r["P"] for r in rows})
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(Ps)))
    Ns = np.array([r["non_embedding"] for r in rows], float)
    grid = np.geomspace(Ns.min() * 0.8, Ns.max() * 1.25, 100)
    for P, c in zip(Ps, colors):
        pts = sorted((r["non_embedding"], r["eval_loss"]) for r in rows if r["P"] == P)
        axes[0].scatter(*zip(*pts), color=c, label=f"P={P}", zorder=3)
        if fit is not None:
            axes[0].plot(grid, SC.predict_loss(fit.constants, grid, P), color=c, lw=1)
    axes[0].set_xscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axes[0].xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e3:.0f}k"))
    axes[0].xaxis.set_minor_formatter(NullFormatter())
    axes[0].set_xticks(sorted({r["non_embedding"] for r in rows if r["P"] == min(Ps)}))  # one tick per backbone
    axes[0].set_xlabel("non-embedding parameters N (prefix + aggregator included)")
    axes[0].set_ylabel("held-out loss (nats/token)")
    if fit is not None:
        c = fit.constants
        axes[0].set_title(f"fit: k={c.k:.3f}, alpha={c.alpha:.3f}, E={c.E:.3f}, R$^2$={fit.r2:.3f}", fontsize=10)
    axes[0].legend()
    sizes = sorted({(r["H"], r["L"]) for r in rows})
    for (H, L), c in zip(sizes, plt.cm.plasma(np.linspace(0, 0.8, len(sizes)))):
        pts = sorted((r["P"], r["eval_loss"]) for r in rows if (r["H"], r["L"]) == (H, L))
        axes[1].plot(*zip(*pts), "o-", color=c, label=f"H={H}, L={L}")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xticks(Ps, [str(p) for p in Ps])
    axes[1].set_xlabel("P (parallel streams)")
    axes[1].set_ylabel("held-out loss (nats/token)")
    axes[1].set_title("same backbone, same training tokens", fontsize=10)
    axes[1].legend()
    B.save_figure(fig, path)


@cli_entry
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 small sizes, P in 1 2, 6 steps")
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="HIDDENxINTERMEDIATExLAYERS,... (default %(default)s)")
    ap.add_argument("--P", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=512, help="held-out windows of seq_len tokens")
    ap.add_argument("--config", default=os.path.join(B.ROOT, "configs", "tiny.yaml"))
    ap.add_argument("--workdir", default=os.path.join(B.ROOT, "runs", "bench_scaling"))
    ap.add_argument("--out", default=B.RESULTS)
    ap.add_argument("--name", default=None, help="result file name (default scaling_law, or scaling_law_quick)")
    ap.add_argument("--verbose", action="store_true", help="the runner's progress lines")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides for every run")
    args = ap.parse_intermixed_args(argv)
    if args.quick:
        args.sizes, args.P, args.steps, args.eval_windows = "32x80x2,64x160x2", [1, 2], 6, 16
        args.workdir += "_quick"
    name = args.name or ("scaling_law_quick" if args.quick else "scaling_law")
    sizes = parse_sizes(args.sizes)
    if any(p < 1 for p in args.P):
        raise UserError("--P values must be >= 1")

    from parscale_jax import scaling as SC

    t0 = time.time()
    env0 = B.environment()
    rows = [run_one(args, H, I, L, P) for (H, I, L) in sizes for P in args.P]

    def fit_with(key):
        try:
            return SC.fit_law([r[key] for r in rows], [r["P"] for r in rows], [r["eval_loss"] for r in rows],
                              dataset="cpu-grid")
        except UserError as e:
            B.log(f"fit skipped: {e}")
            return None

    fit = fit_with("non_embedding")
    fit_bb = fit_with("backbone_non_embedding")

    # goal: every P>1 below P=1 at each size
    checks = []
    for (H, I, L) in sizes:
        base = next((r for r in rows if (r["H"], r["L"], r["P"]) == (H, L, 1)), None)
        for r in rows:
            if (r["H"], r["L"]) == (H, L) and r["P"] > 1 and base is not None:
                checks.append({"H": H, "L": L, "P": r["P"], "delta_vs_P1": r["eval_loss"] - base["eval_loss"]})
    all_lower = bool(checks) and all(c["delta_vs_P1"] < 0 for c in checks)

    header = ["H", "I", "L", "P", "non-embedding N", "backbone N", "held-out loss", "vs P=1", "bits/byte",
              "fit", "train tokens", "tokens/s", "wall s"]
    table = []
    for r in rows:
        base = next((b for b in rows if (b["H"], b["L"], b["P"]) == (r["H"], r["L"], 1)), None)
        pred = float(SC.predict_loss(fit.constants, r["non_embedding"], r["P"])) if fit else None
        table.append([r["H"], r["I"], r["L"], r["P"], f"{r['non_embedding']:,}", f"{r['backbone_non_embedding']:,}",
                      f"{r['eval_loss']:.4f}",
                      "—" if base is None or r is base else f"{r['eval_loss'] - base['eval_loss']:+.4f}",
                      B.fmt(r.get("eval_bpb"), 4), B.fmt(pred, 4), f"{r['train_tokens']:,}",
                      B.fmt(r.get("tokens_per_s"), 0), f"{r['wall_s']:.0f}"])
    md = [B.md_table(header, table), ""]
    if fit:
        c = fit.constants
        md.append(f"Fit (N = non-embedding params incl. prefix and aggregator, {len(rows)} points): "
                  f"E={c.E:.4f}, A={c.A:.4g}, alpha={c.alpha:.4f}, **k={c.k:.4f}**, **R^2={fit.r2:.4f}**.")
    if fit_bb:
        c = fit_bb.constants
        md.append(f"Sensitivity (N = backbone only, the streams' extra params not counted): "
                  f"E={c.E:.4f}, A={c.A:.4g}, alpha={c.alpha:.4f}, k={c.k:.4f}, R^2={fit_bb.r2:.4f}.")
    md.append(f"Goal 'lower held-out loss for every P>1 than P=1 at each size': "
              f"{'met' if all_lower else 'NOT met'} ({sum(c['delta_vs_P1'] < 0 for c in checks)}/{len(checks)}); "
              f"goal 'fitted k > 0': {'met' if fit and fit.constants.k > 0 else 'NOT met'}.")
    md.append(f"Held-out: {rows[0]['eval_tokens']:,} target tokens (the same windows for every run). "
              f"Grid wall time {sum(r['wall_s'] for r in rows) / 60:.1f} min (runs reused from a previous "
              f"invocation count their original time).")
    md.append("")
    md.append(f"![scaling law]({name}.png)")
    png = os.path.join(args.out, f"{name}.png")
    os.makedirs(args.out, exist_ok=True)
    plot(rows, fit, png)
    env = B.environment()
    env["load_average_at_start"] = env0["load_average_1_5_15"]
    payload = {"rows": rows, "fit": fit.to_dict() if fit else None,
               "fit_backbone_N": fit_bb.to_dict() if fit_bb else None,
               "checks": checks, "goal_every_P_lower": all_lower,
               "goal_k_positive": bool(fit and fit.constants.k > 0),
               "settings": {"sizes": sizes, "P": args.P, "steps": args.steps, "batch_size": args.batch_size,
                            "eval_windows": args.eval_windows, "config": os.path.relpath(args.config, B.ROOT),
                            "overrides": args.overrides},
               "wall_s_this_invocation": time.time() - t0, "env": env}
    B.write_results(name, payload, "\n\n".join(md), "Parallel scaling law on the CPU grid", args.out)
    print("\n\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
