"""ParScale's effect measured by this project's own training: P streams placed on a dense loss curve.

    .venv/bin/python bench/parallel_law.py                   # run (or reuse) the grid, then analyse it
    .venv/bin/python bench/parallel_law.py --analyze-only    # analyse whatever runs have finished
    .venv/bin/python bench/parallel_law.py --run P4 --seed 1 # one cell alone: its result as one JSON line

A controlled miniature of the paper's method (issue 24). Every run is ``parscale_jax.runner.train``
on ``configs/tiny.yaml`` (byte tokenizer, the default corpus: this interpreter's standard library,
seq_len 128) with the same steps, batch, learning-rate schedule, data order and seeds; only the
model changes: 600 steps x 16 x 128 = 1,228,800 tokens (20.9 per base-model parameter). The base backbone has 4 layers (H=32,
I=88, 4/2 heads; 58,912 parameters); the ParScale runs put P = 2, 4, 8 streams on it with 8 prefix
tokens per layer (not the paper's 48, which at H=32 would add more than the backbone's own
non-embedding parameters at P=8); the dense controls are P = 1 models about 1.25x, 1.5x, 2x and
3x the base's total parameters, grown in WIDTH (hidden and MLP size; 4 layers and the heads
kept). Seeds: 3 at the base, 2 elsewhere. The held-out split (``data.heldout_fraction`` 0.005 of
the files, 147,876 bytes) is scored whole, in bits per byte.

The analysis (``parscale_jax.scaling.parallel``) fits ``L(N) = E + (A/N)^alpha`` to the dense
runs, reads each P's effective parameters off that curve, ``m(P) = N_eff / N``, and fits
``m(P) = 1 + k ln P``; intervals by a parametric bootstrap over seeds (cell means redrawn with the
pooled seed-to-seed spread, the dense curve refitted each time). N is the non-embedding count; the headline counts the streams'
prefix and gate in N (conservative), the sensitivity row uses the backbone alone. The
equal-training-FLOPs reading compares each P run with the dense curve at P times its compute.

Finished runs are cached in ``<workdir>/<cell>_s<seed>/bench_run.json`` (atomic), so an
interrupted grid resumes and ``--analyze-only`` reports on what has finished.
Writes ``bench/results/parallel_law.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import _common as B  # bench/ is the folder of the running script, so its helpers import directly

from parscale_jax.errors import UserError, cli_entry
from parscale_jax.fileio import write_json

# cell -> (hidden, intermediate, layers, P). Dense widths chosen (multiples of 8) so that the
# total parameter count is ~1.25/1.5/2/3x the base's 58,912 (measured counts in the results).
CELLS = {
    "base": (32, 88, 4, 1),
    "P2": (32, 88, 4, 2),
    "P4": (32, 88, 4, 4),
    "P8": (32, 88, 4, 8),
    "D1.25": (40, 80, 4, 1),
    "D1.5": (40, 112, 4, 1),
    "D2": (48, 120, 4, 1),
    "D3": (56, 176, 4, 1),
}
PREFIX_TOKENS = 8
HELDOUT_FRACTION = 0.005
# most informative first: a complete seed-0 grid, then the base's other seeds, then seed 1 of the
# rest, cheapest first (so that a grid cut short loses the fewest cells' second seed)
ORDER = [(c, 0) for c in ("base", "P8", "P4", "P2", "D3", "D2", "D1.5", "D1.25")] + [("base", 1), ("base", 2)] + \
        [(c, 1) for c in ("D1.25", "D1.5", "D2", "D3", "P2", "P4", "P8")]


def overrides(args, cell: str, seed: int) -> list[str]:
    H, I, L, P = CELLS[cell]
    return [f"model.parscale_n={P}", f"model.hidden_size={H}", f"model.intermediate_size={I}",
            f"model.num_hidden_layers={L}", f"model.parscale_n_tokens={PREFIX_TOKENS}",
            f"seed={seed}", f"data.seed={seed}", f"data.heldout_fraction={HELDOUT_FRACTION}",
            f"steps={args.steps}", f"batch_size={args.batch_size}", "eval_windows=0", "eval_every=0",
            "eval_batch_size=32", f"checkpoint.every={args.steps}", "checkpoint.keep=1",
            f"log_every={max(1, args.steps // 4)}"]


def cached(args, cell: str, seed: int) -> dict | None:
    done = os.path.join(args.workdir, f"{cell}_s{seed}", "bench_run.json")
    if not os.path.exists(done):
        return None
    with open(done) as f:
        rec = json.load(f)
    return rec if rec.get("overrides") == overrides(args, cell, seed) else None


def run_cell(args, cell: str, seed: int) -> dict:
    """Train one cell at one seed (or reuse its finished record); the record."""
    rec = cached(args, cell, seed)
    if rec is not None:
        return rec
    from parscale_jax import train_config
    from parscale_jax import model as M

    over = overrides(args, cell, seed)
    cfg = train_config.load(args.config, over)
    wd = os.path.join(args.workdir, f"{cell}_s{seed}")
    s, params, wall = B.train_fresh(cfg, wd, args.verbose)
    H, I, L, P = CELLS[cell]
    total = M.count_params(params)
    bb = M.count_params({"backbone": params["backbone"]})
    rec = {"name": cell, "P": P, "H": H, "I": I, "L": L, "seed": seed, "overrides": over,
           "params": total, "backbone_params": bb, "extra_fraction": (total - bb) / bb,
           "non_embedding": M.count_params(params, non_embedding=True),
           "backbone_non_embedding": M.count_params({"backbone": params["backbone"]}, non_embedding=True),
           "tokens": cfg.steps * cfg.batch_size * cfg.data.seq_len, "bpb": s["eval_bpb"],
           "eval_loss": s["eval_loss"], "eval_tokens": s["eval_tokens"],
           "final_train_loss": s["losses"][-1][1] if s.get("losses") else None,
           "tokens_per_s": s.get("mean_tokens_per_s"), "compile_s": s.get("compile_s"), "wall_s": wall,
           "load_average": [round(x, 2) for x in os.getloadavg()]}
    write_json(os.path.join(wd, "bench_run.json"), rec, indent=1)  # atomic: whole or absent
    for sub in os.listdir(wd):  # keep only the record: the checkpoints are not needed
        if sub != "bench_run.json" and os.path.isdir(os.path.join(wd, sub)):
            shutil.rmtree(os.path.join(wd, sub))
    return rec


def run_grid(args) -> list[dict]:
    todo = ORDER[: args.limit] if args.limit else ORDER
    rows, t_start, n_new = [], time.time(), 0
    for i, (cell, seed) in enumerate(todo, 1):
        was = cached(args, cell, seed) is not None
        rec = run_cell(args, cell, seed)
        rows.append(rec)
        n_new += not was
        spent = time.time() - t_start
        left = len(todo) - i
        eta = f", ETA ~{spent / n_new * left / 60:.0f} min (from this invocation's mean)" if n_new and left else ""
        B.log(f"[{i}/{len(todo)}] {cell} seed {seed}: {'reused' if was else 'trained'}, "
              f"bpb {rec['bpb']:.4f}, {rec['wall_s']:.0f}s, {rec.get('tokens_per_s') or 0:,.0f} tok/s{eta}")
    return rows


def finished(args) -> list[dict]:
    return [r for c, s in ORDER if (r := cached(args, c, s)) is not None]


@cli_entry
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", choices=sorted(CELLS), help="run one cell alone; print its record as one JSON line")
    ap.add_argument("--seed", type=int, default=0, help="seed of --run (init and data order)")
    ap.add_argument("--analyze-only", action="store_true", help="no training: analyse the finished runs")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=0, help="run only the first N runs of the grid's order")
    ap.add_argument("--bootstrap", type=int, default=400, help="bootstrap resamples for the intervals")
    ap.add_argument("--config", default=os.path.join(B.ROOT, "configs", "tiny.yaml"))
    ap.add_argument("--workdir", default=os.path.join(B.ROOT, "runs", "parallel_law"))
    ap.add_argument("--out", default=B.RESULTS)
    ap.add_argument("--name", default="parallel_law", help="result file name")
    ap.add_argument("--verbose", action="store_true", help="the runner's progress lines")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        raise UserError("--steps and --batch-size must be >= 1")
    if args.run:
        was = cached(args, args.run, args.seed) is not None
        rec = run_cell(args, args.run, args.seed)
        B.log(f"{args.run} seed {args.seed}: {'reused' if was else 'trained'}, bpb {rec['bpb']:.4f}, {rec['wall_s']:.0f}s")
        print(json.dumps(rec), flush=True)
        return 0
    t0 = time.time()
    rows = finished(args) if args.analyze_only else run_grid(args)
    import parallel_law_report as R

    R.report(args, rows, CELLS, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
