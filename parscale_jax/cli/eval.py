"""Evaluate or sample a ParScale checkpoint (this project's checkpoints or Hugging Face dirs).

  held-out loss   python eval.py --checkpoint PATH [--data PATH] [--seq-len L] [--batch-size B] [--P n]
                                 [--output results.json]
  choice tasks    python eval.py --checkpoint PATH --tasks tasks/nextline.jsonl [--P n]
  generation      python eval.py generate --checkpoint PATH --prompt TEXT [--prompt-file F]
                                 [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p p] [--seed S]
  lm-eval tasks   python eval.py harness --checkpoint PATH --tasks T1,T2 [--include-path DIR] [--limit N]

Loss: the token stream is cut into consecutive windows of L tokens, each scored on its L-1
next-token targets (``evaluate.heldout_loss``, the same function the training loop calls); only
the windows scored are read. Which stream (``--split``): without ``--data``, the held-out split
of the training run's data (or of stdlib), what the training loop evaluates; an explicit
``--data`` (a prepared dataset, or a raw source prepared into the cache once) is scored whole
unless ``--split heldout`` is asked. Ids are checked against the model's vocabulary (the
manifest's largest id); bits per byte need a known tokenizer for ``.npy`` ids. Errors are one line (``error: ...``) with exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from parscale_jax import data
from parscale_jax import evaluate as E
from parscale_jax.cli import generate, harness
from parscale_jax.cli.common import add_model_args, load_model, run_data, tokenizer_known
from parscale_jax.errors import UserError, cli_entry
from parscale_jax.fileio import write_json
from parscale_jax.metrics import Progress


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="eval.py", description="Held-out loss and choice-task accuracy.",
                                 epilog="Generation: eval.py generate --help; lm-eval tasks: eval.py harness --help")
    add_model_args(ap)
    ap.add_argument("--data", default=None,
                    help="a prepared dataset directory, 'stdlib', or a text file / dir / glob, JSONL, .npy token ids "
                         "(default: the training run's data.source for a training checkpoint, else stdlib)")
    ap.add_argument("--split", default=None, choices=["heldout", "all"],
                    help="heldout: the training pipeline's held-out split of the data, what the training loop "
                         "evaluates; all: every file of it. Default: all when --data is given (an explicit "
                         "--data is scored whole), heldout when it is not (the run's data, or stdlib)")
    ap.add_argument("--heldout-fraction", type=float, default=None,
                    help="data.heldout_fraction of the split (default: the training run's, else 0.05)")
    ap.add_argument("--format", default=None, choices=["auto", "text", "jsonl", "npy"],
                    help="data format (default: the training run's when --data is not given, else auto)")
    ap.add_argument("--text-field", default=None, help="JSONL text field (default: the run's, else 'text')")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="window length L, L-1 targets per window (default: the run's data.seq_len, else 256)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    ap.add_argument("--tasks", nargs="+", default=None, help="choice-task JSONL file(s): context, choices, answer")
    ap.add_argument("--output", default=None, help="write the results as JSON here")
    return ap


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def _data_defaults(args) -> list[str]:
    """Fill the unset data flags from the training run's config (a training checkpoint), else the
    pipeline's defaults; return the names of the flags taken from the run."""
    run = run_data(args)
    taken = []

    def pick(name, run_key, default, when=True):
        if getattr(args, name) is None:
            if when and run.get(run_key) is not None:
                setattr(args, name, run[run_key])
                taken.append(f"{run_key}={run[run_key]}")
            else:
                setattr(args, name, default)

    same_source = args.data is None or args.data == run.get("source")
    if args.split is None:
        args.split = "heldout" if args.data is None else "all"
    pick("data", "source", None)
    pick("format", "format", "auto", same_source)
    pick("text_field", "text_field", "text", same_source)
    pick("heldout_fraction", "heldout_fraction", data.DataConfig.heldout_fraction)
    pick("seq_len", "seq_len", 256)
    return taken


def _check_args(args) -> None:
    if args.seq_len < 2:
        raise UserError(f"--seq-len {args.seq_len} is invalid: a window needs at least 2 tokens")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} is invalid: use a positive integer")
    if args.max_windows is not None and args.max_windows < 1:
        raise UserError(f"--max-windows {args.max_windows} is invalid: use a positive integer (omit it for all)")
    for t in args.tasks or []:
        if not os.path.isfile(t):
            raise UserError(f"task file {t} does not exist: pass --tasks a JSONL of context/choices/answer records")


def _eval_tokens(args, source: str, spec: str, tok, vocab_size: int):
    """(token stream, whether it holds .npy ids, the dataset's tokenizer when known): the held-out
    split of the prepared dataset of ``source`` (a raw source is prepared into the cache once: the
    training pipeline's split, what the training loop evaluates) or, with --split all, every
    document of it. Ids are checked against the model's vocabulary (the manifest's largest id);
    only the windows scored are read."""
    dcfg = data.DataConfig(source=source, format=args.format, text_field=args.text_field, tokenizer=spec,
                           heldout_fraction=args.heldout_fraction, seq_len=args.seq_len)
    if data.is_prepared(source):
        src, stream = data.eval_source(dcfg, None, args.split, vocab_size)
        return stream, False, data.dataset_tokenizer(src, tok)
    ids = any(f.format == "npy" for f in data.list_files(dcfg))
    src, stream = data.eval_source(dcfg, tok, args.split, vocab_size)
    return stream, ids, tok


def _loss(args, model, params, cfg, tok, spec, taken) -> tuple[dict, list[tuple[str, str]]]:
    if args.seq_len - 1 > cfg.max_position_embeddings:
        raise UserError(f"--seq-len {args.seq_len} needs {args.seq_len - 1} positions but the model has "
                        f"{cfg.max_position_embeddings}: use --seq-len <= {cfg.max_position_embeddings + 1}")
    source = args.data or "stdlib"
    if taken:
        print(f"data: from the training run's config: {', '.join(taken)}", file=sys.stderr)
    tokens, ids, data_tok = _eval_tokens(args, source, spec, tok, cfg.vocab_size)
    bpb_tok = data_tok if tokenizer_known(args) or not ids else None  # ids to bytes need the right tokenizer
    if len(tokens) < args.seq_len:
        raise UserError(f"the {args.split} data of {source} has {len(tokens)} tokens, fewer than one window "
                        f"of --seq-len {args.seq_len}: give more data or a smaller --seq-len")
    n_win = len(tokens) // args.seq_len
    if args.max_windows:
        n_win = min(n_win, args.max_windows)
    print(f"loss: {n_win} windows of {args.seq_len} tokens, batch {args.batch_size}", file=sys.stderr)
    t0 = time.perf_counter()
    res = E.heldout_loss(model, params, tokens, args.seq_len, args.batch_size, args.max_windows, tokenizer=bpb_tok)
    dt = time.perf_counter() - t0
    bpb = res["bits_per_byte"]
    out = dict(loss=res["loss"], perplexity=res["perplexity"], bits_per_byte=bpb, tokens=res["tokens"],
               windows=res["windows"], bytes=res["bytes"], seq_len=args.seq_len, data=source,
               split=args.split, seconds=dt)
    rows = [("loss (nats/token)", f"{res['loss']:.4f}"), ("perplexity", f"{res['perplexity']:.3f}"),
            ("bits per byte", f"{bpb:.4f}" if bpb is not None else
             "n/a (token ids, tokenizer unknown: pass --tokenizer)" if bpb_tok is None else "n/a"),
            ("tokens scored", f"{res['tokens']} ({res['windows']} windows of {args.seq_len})"),
            ("tokens/s", f"{res['tokens'] / max(dt, 1e-9):.0f} (incl. compile)")]
    return out, rows


def _tasks(args, task_records, model, params, tok) -> tuple[dict, list[tuple[str, str]]]:
    out, rows = {}, []
    for name, recs in task_records.items():
        n_seq = sum(len(r["choices"]) for r in recs)
        progress = Progress(n_seq, unit="seq", desc=name, min_interval=10.0)
        t0 = time.perf_counter()
        progress.begin()
        r = E.choice_accuracy(model, params, recs, tok, args.batch_size, progress=lambda i, n: progress.update(i))
        progress.end()
        r.pop("loglik")
        r["seconds"] = time.perf_counter() - t0
        out[name] = r
        rows += [(f"{name} acc", f"{r['acc']:.4f} +- {r['acc_stderr']:.4f} (n={r['n']})"),
                 (f"{name} acc_norm", f"{r['acc_norm']:.4f} +- {r['acc_norm_stderr']:.4f}")]
    return out, rows


def run_eval(args) -> int:
    want_loss = args.data is not None or not args.tasks  # --tasks alone: no loss pass
    taken = _data_defaults(args)
    _check_args(args)
    task_records = {}
    for t in args.tasks or []:
        name = os.path.splitext(os.path.basename(t))[0]
        while name in task_records:
            name += "_"
        task_records[name] = E.load_tasks(t)
    model, params, cfg, tok, spec = load_model(args)
    results: dict = {"checkpoint": os.path.abspath(args.checkpoint), "P": cfg.parscale_n}
    rows = [("checkpoint", args.checkpoint), ("P", str(cfg.parscale_n))]
    if want_loss:
        res, more = _loss(args, model, params, cfg, tok, spec, taken)
        results.update(res)
        rows += more
    if task_records:
        results["tasks"], more = _tasks(args, task_records, model, params, tok)
        rows += more
    print(_table(rows))
    if args.output:
        write_json(args.output, results)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "generate":
        return generate.run(generate.build_parser().parse_args(argv[1:]))
    if argv and argv[0] == "harness":
        return harness.run(harness.build_parser().parse_args(argv[1:]))
    if argv and argv[0] in ("loss", "tasks"):
        argv = argv[1:]
    return run_eval(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
