"""`make demo`: train the tiny model at P=1 and at P=4 (same backbone shape, seed, data and
tokens) on the default corpus, evaluate both on the held-out split, print one table.

    python scripts/demo.py [--out runs/demo] [--steps N] [key=value ...]

Extra key=value overrides go to both runs (e.g. steps=100 for a quicker look).
A second run resumes/reuses finished runs in --out (delete it to start over).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from parscale_jax import runner, train_config
from parscale_jax.errors import cli_entry
from parscale_jax.fileio import write_json, write_text


def table(rows: list[dict]) -> str:
    head = ("| model | P | params | non-embedding | held-out loss (nats/token) | bits per byte | train tokens "
            "| tokens/s (mean after compile) |")
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|"
    lines = [head, sep]
    for r in rows:
        lines.append(f"| tiny | {r['P']} | {r['params']:,} | {r['non_embedding']:,} | {r['eval_loss']:.4f} | "
                     f"{r['eval_bpb']:.4f} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


@cli_entry
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--P", type=int, nargs="+", default=[1, 4])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    rows = []
    t0 = time.time()
    for P in args.P:
        cfg = train_config.load(args.config, [f"model.parscale_n={P}", *args.overrides])
        workdir = os.path.join(args.out, f"P{P}")
        print(f"== training tiny at P={P}: {cfg.steps} steps x {cfg.batch_size} x {cfg.data.seq_len} tokens "
              f"-> {workdir}", file=sys.stderr, flush=True)
        s = runner.train(cfg, workdir)  # a finished run is reused: its summary comes from its last checkpoint
        if s.interrupted:
            return 130
        rows.append({"P": P, "params": s.params, "non_embedding": s.non_embedding_params,
                     "eval_loss": s.eval_loss, "eval_bpb": s.eval_bpb, "eval_tokens": s.eval_tokens,
                     "tokens": s.tokens, "tokens_per_s": s.mean_tokens_per_s or 0.0})
    md = table(rows)
    print("\n" + md)
    write_json(os.path.join(args.out, "results.json"),
               {"rows": rows, "command": " ".join(["python", "scripts/demo.py", *(argv or sys.argv[1:])]),
                "wall_s": time.time() - t0})
    write_text(os.path.join(args.out, "results.md"), md + "\n")
    print(f"\n(held-out: {rows[0].get('eval_tokens')} target tokens per model; results in {args.out}/results.md; "
          f"{time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
