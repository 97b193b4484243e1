"""`make recycle`: the two-stage recipe on the default corpus, as one table.

Stage 1 trains tiny at P=1 with a constant learning rate. Then, each for the same number of
steps and tokens, with the learning rate annealed to zero:

  (a) P=1 continued        init_from=stage1
  (b) P=4, full stage 2    init_from=stage1 model.parscale_n=4
  (c) P=2 and P=4 frozen   init_from=stage1 model.parscale_n=P freeze_backbone=true
                           add_to=OUT/multi  (one checkpoint, one backbone, sets for P=1, 2, 4)

All are evaluated on the same held-out windows and on the project's nextline choice task
(built from the held-out files). Results: OUT/results.{json,md}.

    python scripts/recycle.py [--out runs/recycle] [--stage1-steps N] [--stage2-steps M]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from parscale_jax import data as D
from parscale_jax import evaluate as E
from parscale_jax import loading, runner, tasks, train_config
from parscale_jax import model as M
from parscale_jax.errors import cli_entry
from parscale_jax.fileio import write_json, write_text


@cli_entry
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/recycle")
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--stage1-steps", type=int, default=600)
    ap.add_argument("--stage2-steps", type=int, default=150)
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--task-records", type=int, default=300)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    out = os.path.abspath(args.out)
    stage1 = os.path.join(out, "stage1")
    multi = os.path.join(out, "multi")
    t0 = time.time()

    def run(workdir, *over):
        cfg = train_config.load(args.config, [*args.overrides, "eval_every=0", *over])
        print(f"== {os.path.basename(workdir)}: {' '.join(over)}", file=sys.stderr, flush=True)
        if runner.train(cfg, workdir).interrupted:
            raise SystemExit(130)
        return cfg

    base = run(stage1, "model.parscale_n=1", f"steps={args.stage1_steps}", "optim.schedule=wsd",
               "optim.decay_fraction=0")
    anneal = [f"steps={args.stage2_steps}", "optim.schedule=wsd", "optim.decay_fraction=1.0",
              "optim.min_lr_ratio=0", "optim.warmup_steps=0", f"optim.lr={base.optim.lr}", f"init_from={stage1}"]
    variants = [
        ("P=1 continued", os.path.join(out, "p1_continued"), 1, ["model.parscale_n=1"], None),
        ("P=4 stage 2 (full)", os.path.join(out, "p4_full"), 4, ["model.parscale_n=4"], None),
        ("P=2 stage 2 (frozen backbone)", os.path.join(out, "p2_frozen"), 2,
         ["model.parscale_n=2", "freeze_backbone=true", f"add_to={multi}"], 2),
        ("P=4 stage 2 (frozen backbone)", os.path.join(out, "p4_frozen"), 4,
         ["model.parscale_n=4", "freeze_backbone=true", f"add_to={multi}"], 4),
    ]
    if os.path.exists(multi) and not all(os.path.isdir(os.path.join(v[1], "checkpoints")) for v in variants[2:]):
        raise SystemExit(f"error: {multi} exists from an unfinished run: delete {out} and start again")
    for _, wd, _, over, _ in variants:
        if not os.path.isfile(os.path.join(wd, "done")):
            run(wd, *anneal, *over)
            write_text(os.path.join(wd, "done"), "")

    # evaluation: the same held-out windows and task records for every model
    tok = D.load_tokenizer(base.data.tokenizer)
    _, held = D.eval_source(base.data, tok, "heldout")  # read window by window
    seq = base.data.seq_len
    records = tasks.build_nextline(tasks.heldout_source_files(base.data.source, base.data.heldout_fraction),
                                   n=args.task_records, seed=0)
    rows = []
    models = [("stage 1 (P=1)", stage1, None, 0)] + [(n, wd, None, args.stage2_steps) for n, wd, *_ in variants]
    models += [(f"multi-P checkpoint at P={P}", multi, P, args.stage2_steps) for P in (2, 4)]
    for name, path, P, extra_steps in models:
        cfg, params = loading.load(path, P)
        model = M.make_model(cfg)
        res = E.heldout_loss(model, params, held, seq, 32, max_windows=args.eval_windows, tokenizer=tok)
        acc = E.choice_accuracy(model, params, records, tok, batch_size=32)
        rows.append({"model": name, "P": cfg.parscale_n, "stage2_steps": extra_steps,
                     "stage2_tokens": extra_steps * base.batch_size * seq,
                     "eval_loss": res["loss"], "eval_bpb": res["bits_per_byte"],
                     "eval_tokens": res["tokens"], "acc": acc["acc"], "acc_norm": acc["acc_norm"],
                     "params": M.count_params(params)})
        print(f"{name}: loss {res['loss']:.4f}, task acc {acc['acc']:.3f}", file=sys.stderr, flush=True)

    head = ("| model | P | stage-2 tokens | params | held-out loss | bits/byte | nextline acc | acc_norm |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head] + [f"| {r['model']} | {r['P']} | {r['stage2_tokens']:,} | {r['params']:,} | {r['eval_loss']:.4f} | "
                      f"{r['eval_bpb']:.4f} | {r['acc']:.3f} | {r['acc_norm']:.3f} |" for r in rows]
    md = "\n".join(lines)
    print("\n" + md)
    cont = next(r for r in rows if r["model"] == "P=1 continued")
    full4 = next(r for r in rows if r["model"] == "P=4 stage 2 (full)")
    verdict = (f"P=4 stage 2 {'beat' if full4['eval_loss'] < cont['eval_loss'] else 'did not beat'} continued P=1 "
               f"at equal tokens: held-out loss {full4['eval_loss']:.4f} vs {cont['eval_loss']:.4f}")
    print("\n" + verdict)
    info = {"rows": rows, "verdict": verdict, "task_records": len(records), "wall_s": time.time() - t0,
            "command": " ".join(["python", "scripts/recycle.py", *(argv if argv is not None else sys.argv[1:])])}
    write_json(os.path.join(out, "results.json"), info)
    write_text(os.path.join(out, "results.md"), md + "\n\n" + verdict + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
